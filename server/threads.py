"""Thread limits for the server's linear algebra: a wrapper around any ``Aggregator``.

Which pools: BLAS (OpenBLAS, MKL, BLIS, whatever numpy loaded), the libraries the server's
numpy math runs in, with their threading layer (pthreads or OpenMP: ``openblas_set_num_threads``
governs either). The OpenMP runtime's own setting is left alone on purpose: it is per thread
(an OpenMP ICV), so a limit set in the ServerApp thread and restored from another thread would
stay in force in the first one for good, and the server's math does not run in it anyway;
torch's OpenMP pool serves the evaluation thread and the clients.

Why: on a busy machine (the ServerApp thread, Ray's actors and torch sharing a few cores)
OpenBLAS's worker threads busy-wait for work; a 576 x 64 QR that takes ~30 ms in a quiet
process kept Fed-SB's server start spinning in ``exec_blas`` for over ten minutes. Limiting
the BLAS pools for the duration of the server's own math ends that, and limiting
them only there (threadpoolctl, scoped) leaves every other thread and process alone: the
clients train with whatever pools they have, and nothing in the environment changes.

``ThreadLimited`` limits ``init_state``, ``downlink``, ``aggregate``, ``global_delta`` and
``client_delta`` of the aggregator it wraps; ``math_limits(aggregator)`` gives the same
limit to code around an aggregator (the strategy's relative-error diagnostic, which calls
it), finding the wrapper under other wrappers such as central DP's; ``server_math(n)`` is
the limit itself, for the Fed-SB init's SVDs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from logging import WARNING
from typing import Any

from flwr.common import log

from aggregation.base import Aggregation, Aggregator, ClientInfo, ClientUpdate, Downlink, ModelSpec, Tensors


class _ThreadLimit(threading.local):
    """The limit of this thread's outermost ``server_math`` block; nested blocks cost nothing.

    threadpoolctl (3.8) lets one Python thread at a time control a process-wide pool such as
    OpenBLAS's: the first thread that sets a limit, for as long as it lives; the same thread
    must therefore apply a limit and restore it, and the ServerApp does all its math in its
    own thread.
    """

    depth = 0
    limiter: Any = None

    @contextlib.contextmanager
    def __call__(self, threads: int) -> Iterator[None]:
        if self.depth == 0:
            controller = _controller(len(sys.modules))
            self.limiter = controller.limit(limits=threads, user_api="blas")  # applied now
            _warn_if_not_in_force(controller, threads)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.limiter.restore_original_limits()
                self.limiter = None


@functools.lru_cache(maxsize=1)
def _controller(_modules: int) -> Any:
    """threadpoolctl's view of the loaded libraries, found again only when imports changed.

    Finding them walks every loaded shared object (2 ms in a quiet process, tens of ms in a
    ServerApp with torch and Ray loaded), too much for every downlink. A library is loaded by
    an import, so the count of imported modules is the cache key: numpy's BLAS, the one the
    server's math uses, is loaded long before the first round.
    """
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _warn_if_not_in_force(controller: Any, threads: int) -> None:
    above = [lib["filepath"] for lib in controller.info() if lib["user_api"] == "blas" and lib["num_threads"] > threads]
    above = [path for path in above if path not in _WARNED]
    if above:  # another live thread holds threadpoolctl's control of the pool; said once per library
        _WARNED.update(above)
        log(WARNING, "server-threads %d is not in force in %s: another thread controls the BLAS pool", threads,
            ", ".join(above))


_thread_limit = _ThreadLimit()
_WARNED: set[str] = set()


@contextlib.contextmanager
def server_math(threads: int) -> Iterator[None]:
    """BLAS pools limited to ``threads`` inside the block (0: no limit)."""
    if threads < 0:
        raise ValueError(f"server-threads must be >= 0 (0 = no limit), got {threads}")
    if threads == 0:
        yield
        return
    with _thread_limit(threads):
        yield


class ThreadLimited:
    """An aggregator whose every method runs with the pools limited to ``threads``."""

    def __init__(self, *, inner: Aggregator, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"ThreadLimited needs threads >= 1 (0 means: do not wrap), got {threads}")
        self.inner = inner
        self.threads = threads
        self.name = getattr(inner, "name", type(inner).__name__)
        self.uplink = inner.uplink
        self.adapter_kind = inner.adapter_kind
        self.weighted_sum = inner.weighted_sum
        self.accepts_calibration = inner.accepts_calibration

    def limited(self) -> contextlib.AbstractContextManager[None]:
        return server_math(self.threads)

    def init_state(self, spec: ModelSpec) -> Any:
        with self.limited():
            return self.inner.init_state(spec)

    def downlink(self, state: Any, client: ClientInfo) -> Downlink:
        with self.limited():
            return self.inner.downlink(state, client)

    def aggregate(self, state: Any, updates: Sequence[ClientUpdate]) -> Aggregation:
        with self.limited():
            return self.inner.aggregate(state, updates)

    def global_delta(self, state: Any) -> Tensors:
        with self.limited():
            return self.inner.global_delta(state)

    def client_delta(self, state: Any, update: ClientUpdate) -> Tensors:
        with self.limited():
            return self.inner.client_delta(state, update)


def math_limits(aggregator: Any) -> contextlib.AbstractContextManager[None]:
    """The limit of the ``ThreadLimited`` in this chain of wrappers (each keeps ``inner``), or none."""
    while aggregator is not None:
        if isinstance(aggregator, ThreadLimited):
            return aggregator.limited()
        aggregator = getattr(aggregator, "inner", None)
    return contextlib.nullcontext()
