"""Benchmark every registered aggregator at LLaMA-2-7B adapter shapes.

For each aggregator in ``aggregation.names()``, each rank setting (all clients at
rank 16; ranks drawn from 4..64) and each client count, it reports:

* ``agg_s``     - seconds of one ``aggregate`` call (``time.perf_counter``, untraced);
* ``peak_MB``   - peak memory allocated during a separate, traced ``aggregate`` call
                  (``tracemalloc``, which numpy reports its buffers to), outputs included;
* ``up_MB``     - bytes one client uploads, float32 on the wire, mean over clients;
* ``down_MB``   - bytes one client receives: downlink adapter + frozen factors (frozen
                  ones counted every round, an upper bound: the strategy sends them once
                  per node) + the round's base update, float32, mean over clients;
* ``x_sum``     - agg_s over one plain ``acc += arr`` pass over the same uploaded arrays:
                  how far above the memory-bandwidth floor (reading every upload once)
                  the method is;
* ``diag_s``    - seconds of ``diagnostics.relative_error`` per module it visits
                  (``max_modules=--diag-modules``, default 1), timed separately, and
                  ``rel_err`` its value. Its cost grows as (d_out + d_in) (sum r_k)^2
                  (QRs of the stacked ideal update), so above ``--diag-rank-limit``
                  stacked ranks it is run only for FedAvg and shown as "skip" (null in
                  the JSON) for the others.

LLaMA-2-7B with LoRA on q_proj and v_proj has 32 layers x 2 = 64 modules of
4096 x 4096. Modules are independent and identical in shape, so only a sample of them
is aggregated (``--module-sample``, default 2) and agg_s, up_MB and down_MB are scaled
to all 64; peak_MB is measured on one module and scaled by 64, which is right for what
the call keeps (states, base updates) and over-counts per-module scratch. ``x_sum`` is
a ratio on the same sample, and ``diag_s`` is per visited module on the sampled
model (the default relative_error call visits 8 modules; on the full model each of its
``client_delta`` calls also folds all 64 modules, so it costs more than 8 x diag_s).
``--module-sample 0`` runs all 64: FlexLoRA-style SVDs of 100 stacked clients then take
a long time on a 2-core machine.

Memory: 100 clients x 64 modules at ranks up to 64 would be ~7 GB of float32 uploads.
Uploads are float32 and come from a pool of distinct random arrays per shape
(``--pool-mb``, default 256 MB, far larger than CPU caches) that clients and modules
share by reference; per-client byte counts still count every client's own copy.

RoLoRA is measured on its first round, a B-round (its A-rounds upload r x d_in A
instead: the same bytes on these square modules). FedSA-LoRA's ``rel_err`` is "skip"
(null): its clients' B never reach the server, so their adapters are unknown there.

Usage: ``python -m simulations.bench_aggregation [--clients 10,100] [--quick]
[--json PATH] [--module-sample K] [--methods a,b]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import aggregation
from aggregation.base import (
    ClientInfo,
    ClientUpdate,
    ModelSpec,
    ModuleShape,
    expected_shapes,
)
from aggregation.diagnostics import relative_error

BYTES_ON_WIRE = 4  # float32
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One model geometry: module shape and count, and the two rank regimes."""

    d_out: int
    d_in: int
    modules: int
    uniform_rank: int
    mixed_ranks: tuple[int, int]  # inclusive range the mixed ranks are drawn from


FULL = Setting(d_out=4096, d_in=4096, modules=64, uniform_rank=16, mixed_ranks=(4, 64))
QUICK = Setting(d_out=96, d_in=80, modules=4, uniform_rank=4, mixed_ranks=(2, 8))


def module_names(count: int) -> list[str]:
    """q_proj and v_proj of consecutive layers, as PEFT names them."""
    return [f"layers.{i // 2}.{'q_proj' if i % 2 == 0 else 'v_proj'}" for i in range(count)]


class UploadPool:
    """Distinct random float32 arrays per shape, shared by reference across uploads.

    Sharing is what lets 100 clients x 64 modules fit in memory. Each shape gets an
    equal part of the budget, so the pool as a whole stays far larger than the CPU
    caches and repeated reads still come from main memory. Arrays are made on first
    use and reused by every aggregator of a configuration.
    """

    def __init__(self, seed: int, budget_bytes: int, shapes_hint: int, max_uses: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._per_shape = budget_bytes / max(shapes_hint, 1)
        self._max_uses = max_uses
        self._arrays: dict[tuple[int, int], list[np.ndarray]] = {}

    def get(self, shape: tuple[int, int], index: int) -> np.ndarray:
        if shape not in self._arrays:
            nbytes = shape[0] * shape[1] * 4
            count = int(min(self._max_uses, max(1, self._per_shape // nbytes)))
            scale = np.float32(1.0 / math.sqrt(max(shape)))
            self._arrays[shape] = [
                scale * self._rng.standard_normal(shape, dtype=np.float32) for _ in range(count)
            ]
        arrays = self._arrays[shape]
        return arrays[index % len(arrays)]

    @property
    def distinct_bytes(self) -> int:
        return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)


@dataclass(frozen=True, kw_only=True)
class Clients:
    """One configuration's clients: ranks, example counts and alphas."""

    ranks: list[int]
    counts: list[int]
    alphas: list[float]


def draw_clients(rng: np.random.Generator, setting: Setting, n: int, mixed: bool) -> Clients:
    if mixed:
        low, high = setting.mixed_ranks
        ranks = [int(r) for r in rng.integers(low, high + 1, size=n)]
    else:
        ranks = [setting.uniform_rank] * n
    return Clients(
        ranks=ranks,
        counts=[int(c) for c in rng.integers(50, 1000, size=n)],
        alphas=[float(a) for a in rng.choice([8.0, 16.0, 32.0], size=n)],
    )


def build_updates(
    agg: aggregation.Aggregator, spec: ModelSpec, clients: Clients, pool: UploadPool
) -> list[ClientUpdate]:
    """Uploads carrying exactly the factors this aggregator asks for in its first round
    (``Downlink.uplink``, else ``agg.uplink``: RoLoRA's first round is a B-round)."""
    names = sorted(spec.modules)
    state = agg.init_state(spec)
    updates = []
    for k, (r, n, alpha) in enumerate(zip(clients.ranks, clients.counts, clients.alphas)):
        asked = agg.downlink(state, ClientInfo(node_id=f"c{k:03d}", rank=r, alpha=alpha)).uploads(agg.uplink)
        tensors = {}
        for m, name in enumerate(names):
            shapes = expected_shapes(agg.adapter_kind, asked, spec.modules[name], r)
            tensors[name] = {f: pool.get(shape, k * len(names) + m) for f, shape in shapes.items()}
        updates.append(
            ClientUpdate(node_id=f"c{k:03d}", num_examples=n, rank=r, alpha=alpha, tensors=tensors)
        )
    return updates


def summation_pass(updates: Sequence[ClientUpdate]) -> float:
    """Seconds for ``acc += arr`` over every uploaded array, in float64 like the servers."""
    largest = max(a.size for u in updates for f in u.tensors.values() for a in f.values())
    acc = np.zeros(largest)
    start = time.perf_counter()
    for update in updates:
        for factors in update.tensors.values():
            for arr in factors.values():
                flat = arr.reshape(-1)
                acc[: flat.size] += flat
    return time.perf_counter() - start


def tensor_bytes(tensors: dict) -> int:
    return sum(np.size(a) for f in tensors.values() for a in f.values()) * BYTES_ON_WIRE


def traced_peak(agg: aggregation.Aggregator, spec: ModelSpec, updates) -> int:
    """Peak bytes allocated while ``aggregate`` runs, its retained output included."""
    state = agg.init_state(spec)
    gc.collect()
    tracemalloc.start()
    try:
        result = agg.aggregate(state, updates)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def measure(
    name: str,
    sample: ModelSpec,
    single: ModelSpec,
    clients: Clients,
    pool: UploadPool,
    scale: float,
    repeat: int,
    diag_modules: int | None,
) -> dict:
    """All numbers for one aggregator on one configuration (diag_modules None: skip).

    Time is taken untraced on ``sample`` modules; memory from a separate traced call on
    ``single`` (one module) scaled to the model, so tracemalloc's bookkeeping never
    inflates the timings.
    """
    agg = aggregation.create(name)
    state = agg.init_state(sample)
    updates = build_updates(agg, sample, clients, pool)
    agg_s = math.inf
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = agg.aggregate(state, updates)
        agg_s = min(agg_s, time.perf_counter() - start)

    peak = traced_peak(agg, single, build_updates(agg, single, clients, pool))
    floor_s = min(summation_pass(updates) for _ in range(repeat))

    diag_s = err = math.nan
    if diag_modules is not None:
        visited = min(diag_modules, len(sample.modules))
        start = time.perf_counter()
        err = relative_error(agg, state, result, updates, max_modules=visited)
        diag_s = (time.perf_counter() - start) / visited

    base_bytes = tensor_bytes(result.base_update)
    down_by_client: dict[tuple[int, float], int] = {}
    for r, alpha in set(zip(clients.ranks, clients.alphas)):
        down = agg.downlink(result.state, ClientInfo(node_id="probe", rank=r, alpha=alpha))
        down_by_client[(r, alpha)] = tensor_bytes(down.adapter) + tensor_bytes(down.frozen)
    down = [down_by_client[key] + base_bytes for key in zip(clients.ranks, clients.alphas)]
    up = [tensor_bytes(u.tensors) for u in updates]
    n_modules = len(sample.modules)
    return {
        "aggregator": name,
        "agg_s": agg_s * scale,
        "peak_MB": peak * n_modules * scale / 2**20,
        "up_MB": float(np.mean(up)) * scale / 2**20,
        "down_MB": float(np.mean(down)) * scale / 2**20,
        "x_sum": agg_s / floor_s if floor_s > 0 else math.inf,
        "diag_s": diag_s,
        "rel_err": err,
    }


def run(
    client_counts: Sequence[int],
    setting: Setting,
    sample_size: int,
    pool_mb: float,
    seed: int,
    repeat: int = 1,
    diag_modules: int = 1,
    diag_rank_limit: int = 1024,
    methods: Sequence[str] | None = None,
) -> list[dict]:
    # The gc.collect() calls between timings must scan only what the benchmark made: in a
    # process that already holds torch and a model (the test suite), every full collection
    # walked that whole heap too, and the quick run took 130 s instead of 2.
    gc.collect()
    gc.freeze()
    try:
        return _run(client_counts, setting, sample_size, pool_mb, seed, repeat, diag_modules, diag_rank_limit,
                    methods)
    finally:
        gc.unfreeze()


def _run(client_counts: Sequence[int], setting: Setting, sample_size: int, pool_mb: float, seed: int, repeat: int,
         diag_modules: int, diag_rank_limit: int, methods: Sequence[str] | None) -> list[dict]:
    scale = setting.modules / sample_size
    shape = ModuleShape(d_out=setting.d_out, d_in=setting.d_in)
    names = module_names(sample_size)
    rows = []
    for mixed in (False, True):
        for n in client_counts:
            clients = draw_clients(np.random.default_rng([seed, n, int(mixed)]), setting, n, mixed)
            max_rank = setting.mixed_ranks[1] if mixed else setting.uniform_rank
            sample = ModelSpec(modules={m: shape for m in names}, max_rank=max_rank, seed=seed)
            single = ModelSpec(modules={names[0]: shape}, max_rank=max_rank, seed=seed)
            pool = UploadPool(
                seed, int(pool_mb * 2**20), 2 * len(set(clients.ranks)), n * sample_size
            )
            low, high = setting.mixed_ranks
            label = f"{low}..{high}" if mixed else f"{setting.uniform_rank}"
            heavy_diag = sum(clients.ranks) > diag_rank_limit
            registered = list(methods or aggregation.names())
            # the one diagnosed when it is costly: FedAvg, the baseline, if it runs
            probe = "fedavg" if "fedavg" in registered else registered[0]
            for name in registered:
                diag = None if heavy_diag and name != probe else diag_modules
                try:
                    row = measure(name, sample, single, clients, pool, scale, repeat, diag)
                except Exception as exc:  # report and go on: one method must not stop the rest
                    row = {"aggregator": name, "error": f"{type(exc).__name__}: {exc}"}
                row.update({"clients": n, "ranks": label, "pool_MB": pool.distinct_bytes / 2**20})
                rows.append(row)
                print_row(row)
                gc.collect()
    return rows


COLUMNS = ("agg_s", "peak_MB", "up_MB", "down_MB", "x_sum", "diag_s", "rel_err")


def print_header(setting: Setting, sample: int, pool_mb: float, repeat: int) -> None:
    scale = setting.modules / sample
    print(
        f"# LoRA on {setting.modules} modules of {setting.d_out}x{setting.d_in}. agg_s, up_MB "
        f"and down_MB measured on {sample} module(s) and scaled x{scale:g}; peak_MB from one "
        f"traced module scaled x{setting.modules:g}; best of {repeat} timing run(s)."
    )
    print(
        f"# Uploads are float32, drawn from a pool of distinct random arrays (<= {pool_mb:g} MB "
        "per configuration) shared by reference across clients and modules; byte counts are "
        "per client, float32 on the wire, as if every client sent its own arrays."
    )
    threads = {k: os.environ[k] for k in BLAS_THREAD_VARS if k in os.environ}
    print(
        f"# {os.cpu_count()} CPU(s); BLAS threads: {threads or 'library default'} (on a shared "
        "machine OPENBLAS_NUM_THREADS=1 avoids oversubscribed BLAS threads spinning)"
    )
    print(f"{'clients':>7} {'ranks':<8} {'aggregator':<12} " + " ".join(f"{c:>9}" for c in COLUMNS))


def print_row(row: dict) -> None:
    head = f"{row['clients']:>7} {row['ranks']:<8} {row['aggregator']:<12} "
    if "error" in row:
        print(head + "ERROR " + row["error"], flush=True)
        return
    cells = [
        f"{'skip':>9}" if math.isnan(row[c]) else f"{row[c]:>9.2e}" if c == "rel_err"
        else f"{row[c]:>9.4g}"
        for c in COLUMNS
    ]
    print(head + " ".join(cells), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", default="10,100", help="comma-separated client counts")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--module-sample",
        type=int,
        default=None,
        help="modules actually aggregated (0 = all; default 2, all with --quick)",
    )
    parser.add_argument("--pool-mb", type=float, default=256.0, help="distinct upload data")
    parser.add_argument("--repeat", type=int, default=1, help="timing runs, best one kept")
    parser.add_argument(
        "--diag-modules", type=int, default=1, help="modules relative_error visits (timed)"
    )
    parser.add_argument(
        "--diag-rank-limit",
        type=int,
        default=1024,
        help="above this sum of client ranks, time relative_error for one aggregator only",
    )
    parser.add_argument("--methods", default="", help="comma-separated aggregators (default: every registered one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    for name in methods or ():
        try:
            aggregation.get_class(name)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        client_counts = []
    if not client_counts or min(client_counts) < 1:
        parser.error(f"--clients needs positive integers such as 10,100, got {args.clients!r}")
    if args.repeat < 1 or args.diag_modules < 1:
        parser.error("--repeat and --diag-modules must be >= 1")
    setting = QUICK if args.quick else FULL
    pool_mb = min(args.pool_mb, 8.0) if args.quick else args.pool_mb
    wanted = args.module_sample if args.module_sample is not None else (0 if args.quick else 2)
    sample = min(wanted, setting.modules) if wanted > 0 else setting.modules
    print_header(setting, sample, pool_mb, args.repeat)
    start = time.perf_counter()
    rows = run(
        client_counts,
        setting,
        sample,
        pool_mb,
        args.seed,
        repeat=args.repeat,
        diag_modules=args.diag_modules,
        diag_rank_limit=args.diag_rank_limit,
        methods=methods,
    )
    print(f"# total {time.perf_counter() - start:.1f} s", flush=True)
    if args.json:
        meta = {
            **setting.__dict__,
            "module_sample": sample,
            "repeat": args.repeat,
            "diag_modules": args.diag_modules,
            "diag_rank_limit": args.diag_rank_limit,
            "cpus": os.cpu_count(),
            "blas_threads": {k: os.environ[k] for k in BLAS_THREAD_VARS if k in os.environ},
        }
        with open(args.json, "w") as fh:
            clean = [{k: None if v != v else v for k, v in r.items()} for r in rows]  # NaN
            json.dump({"setting": meta, "rows": clean}, fh, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
