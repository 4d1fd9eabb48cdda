"""When the server evaluates the global adapter, and without holding up training.

Round 0 and the last round are always evaluated, every ``eval-every``-th round in
between. An evaluation runs in a background thread on a snapshot of the round's
global adapter and base-update log (both immutable once taken: the strategy replaces
its state, never edits it), so round k's evaluation overlaps round k+1's training: in
simulation the clients train in Ray's worker processes, in deployment on their own
machines, while the ServerApp would otherwise only wait. It is recorded against round k
whenever it finishes; the last round's is waited for before the run is marked done,
and an evaluation that fails fails the run, as a synchronous one would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aggregation import Tensors

if TYPE_CHECKING:  # server.evaluate holds the model: torch, transformers and PEFT
    from server.evaluate import TimedEval

Evaluate = Callable[[Sequence[tuple[int, Tensors]], Tensors], "TimedEval"]
Record = Callable[[int, "TimedEval"], None]


def due(number: int, *, every: int, last: int) -> bool:
    """Round 0, every ``every``-th round and the last round."""
    return number == 0 or number == last or number % every == 0


class EvaluationSchedule:
    """At most one evaluation in flight; each is recorded by ``record`` from the thread that joins it."""

    def __init__(self, *, evaluate: Evaluate, record: Record, every: int, overlap: bool = True) -> None:
        if every < 1:
            raise ValueError(f"eval-every must be >= 1, got {every}")
        self.evaluate = evaluate
        self.record = record
        self.every = every
        self.overlap = overlap
        self._thread: threading.Thread | None = None
        self._result: tuple[int, TimedEval] | None = None
        self._error: BaseException | None = None

    def submit(self, number: int, *, merge_log: Sequence[tuple[int, Tensors]], global_delta: Tensors,
               last: int) -> None:
        """Evaluate round ``number`` if it is due; waits for the previous evaluation first."""
        self.wait()
        if not due(number, every=self.every, last=last):
            return
        merges = list(merge_log)  # the strategy appends to its log next round
        if not self.overlap or number == last:
            self.record(number, self.evaluate(merges, global_delta))
            return
        self._thread = threading.Thread(target=self._run, args=(number, merges, global_delta), daemon=True,
                                        name=f"fedlora-eval-{number}")
        self._thread.start()

    def _run(self, number: int, merges: list[tuple[int, Tensors]], delta: Tensors) -> None:
        try:
            self._result = (number, self.evaluate(merges, delta))
        except BaseException as exc:  # re-raised in the strategy's thread by ``wait``
            self._error = exc

    def wait(self) -> None:
        """Join the evaluation in flight (if any), record it, re-raise its error."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, result, self._error, self._result = self._error, self._result, None, None
        if error is not None:
            raise error
        if result is not None:
            self.record(*result)
