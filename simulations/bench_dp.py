"""DP-SGD step time and peak memory against a plain step, per Opacus grad-sample mode.

For the default model (SmolLM2-135M, LoRA rank 8 on q_proj and v_proj, batch 8 of
128-token sequences) it times one training step (forward, per-sequence loss,
backward, optimizer step) without DP and with DP-SGD in each mode:

* ``hooks``     Opacus's per-layer per-sample-gradient hooks (what fedlora uses);
* ``ghost``     ghost clipping: per-example gradient norms, two backward passes;
* ``functorch`` per-sample gradients through ``torch.func`` for every layer;
* ``ew``        PyTorch's ExpandedWeights (needs ``wrap_model=True`` and a positional
                input, so it is driven directly here, not through fedlora's hook).

Columns: ``plain_s`` (median wall seconds of a plain step, timed in the same process
before and after the DP steps, so load drift on a shared machine hits both), ``step_s``
(median wall seconds of a DP step after warm-up), ``x_plain`` (their ratio), ``x_cpu``
(the same ratio in process CPU time, which other processes' load hardly moves: the
figure to trust on a shared machine, best with ``--threads 1`` so idle threads do not
spin), ``peak_rss_MB`` (the
process's peak resident memory: each mode runs in a fresh subprocess, and
``resource.getrusage`` sees torch's CPU allocations, which ``tracemalloc`` does not) and
``vs_plain_MB`` (that minus the plain-only process's peak: the DP overhead, since both
include the model). On CUDA the rows also carry ``peak_cuda_MB``. A mode that fails
prints its error instead of numbers.

Every step sees the same fixed batch of exactly ``batch`` sequences (random token ids,
the first quarter of each sequence masked out as the prompt), so the modes do the same
work; real DP training samples Poisson batches of varying size. Noise is on
(multiplier 1.0, clip 1.0) so the noise draw is timed too.

Usage: ``python -m simulations.bench_dp [--quick] [--steps N] [--json PATH]``;
``--quick`` uses the tiny smoke-test model and fewer steps.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES: tuple[str, ...] = ("plain", "hooks", "ghost", "functorch", "ew")
COLUMNS: tuple[str, ...] = ("plain_s", "step_s", "x_plain", "x_cpu", "peak_rss_MB", "vs_plain_MB")


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _batch(tokenizer, *, batch: int, seq_len: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # the "prompt": no loss there, as in real examples
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _timed(
    step: Callable[[], None], *, warmup: int, steps: int, sync: Callable[[], None]
) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) per timed step."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def worker(
    mode: str, *, model_name: str, rank: int, batch: int, seq_len: int, warmup: int, steps: int, threads: int = 0
) -> dict:
    """One mode in this process: build, time, report (called in a fresh subprocess).

    The plain step is timed in the same process before *and* after the DP steps, and
    ``x_plain`` is taken against both: on a shared machine the load drifts, and a
    ratio measured minutes apart in another process would mostly measure that drift.
    """
    import copy
    import warnings

    import torch

    from core.data import Example
    from core.model import AdaptedModel, AdapterSpec
    from core.presets import load_base
    from core.trainer import TrainConfig, device, sequence_losses, to_device
    from privacy.dpsgd import DPSGDConfig, OpacusDPSGD

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = device()
    base = load_base(model_name)
    model = copy.deepcopy(base.model).to(dev)  # DP order: model, device, adapters, optimizer
    adapted = AdaptedModel(model, AdapterSpec(kind="lora", rank=rank, alpha=2.0 * rank, targets=("q_proj", "v_proj")))
    model = adapted.model.train()
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-4)
    data = to_device(_batch(base.tokenizer, batch=batch, seq_len=seq_len, seed=0), dev)

    def plain_step() -> None:
        loss = sequence_losses(model, data).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _timed(plain_step, warmup=warmup, steps=steps, sync=sync)
        dp = plain
        if mode != "plain":
            if mode == "ew":
                dp_step, close = _ew_step(model, optimizer, data, batch=batch)
            else:
                # fedlora's own path: `batch` examples in 4 batches gives sample rate 1/4
                config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
                                     steps=warmup + steps, grad_sample_mode=mode, noise_seed=0, sampling_seed=0)
                cfg = TrainConfig(steps=warmup + steps, batch_size=batch, learning_rate=1e-4, max_len=seq_len, seed=0)
                placeholders = [Example(prompt="x", response="y")] * (4 * batch)
                session = OpacusDPSGD(config=config).attach(model=model, optimizer=optimizer, examples=placeholders,
                                                            tokenizer=base.tokenizer, cfg=cfg)

                def dp_step() -> None:
                    session.step(sequence_losses(model, data))

                close = session.close
            dp = _timed(dp_step, warmup=warmup, steps=steps, sync=sync)
            close()  # hooks off: the model is plain again
            plain += _timed(plain_step, warmup=0, steps=steps, sync=sync)
    row: dict = {"mode": mode, "device": dev.type, "threads": torch.get_num_threads()}
    (row["plain_s"], row["plain_cpu_s"]), (row["step_s"], row["step_cpu_s"]) = _medians(plain), _medians(dp)
    row["x_plain"] = row["step_s"] / row["plain_s"]
    row["x_cpu"] = row["step_cpu_s"] / row["plain_cpu_s"]
    row["peak_rss_MB"] = _peak_rss_mb()
    if dev.type == "cuda":
        row["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _ew_step(model, optimizer, data: dict, *, batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """ExpandedWeights: Opacus's GradSampleModuleExpandedWeights around the PEFT model."""
    import torch
    from opacus.grad_sample import GradSampleModuleExpandedWeights
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    generator = torch.Generator(device=data["input_ids"].device).manual_seed(0)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                               generator=generator)

    def step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)  # EW refuses to run with stale grad_sample
        logits = wrapped(data["input_ids"], attention_mask=data["attention_mask"]).logits
        labels = data["labels"][:, 1:]
        mask = labels != -100
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none"
        ).view_as(labels) * mask
        (losses.sum(1) / mask.sum(1).clamp(min=1)).mean().backward()
        dp_optimizer.step()

    def close() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        wrapped.cleanup()

    return step, close


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "simulations.bench_dp", "--worker", mode, "--model", args.model,
        "--rank", str(args.rank), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mode": mode, "error": tail[:200]}
    return json.loads(lines[-1])


def table(rows: Sequence[dict]) -> list[str]:
    out = [f"{'mode':<10} " + " ".join(f"{c:>12}" for c in COLUMNS)]
    for row in rows:
        if "error" in row:
            out.append(f"{row['mode']:<10} ERROR {row['error']}")
        else:
            out.append(f"{row['mode']:<10} " + " ".join(f"{row[c]:>12.3f}" for c in COLUMNS))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_dp", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test model, fewer steps")
    parser.add_argument("--model", default=None, help="default: smollm2 (tiny with --quick)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mode")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    # a SmolLM2 step takes tens of seconds on a small CPU: few steps, medians, same-process ratios
    args.warmup = args.warmup if args.warmup is not None else 1
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "plain" not in modes:
        parser.error(f"--modes: unknown {unknown}; valid {list(MODES)}, and 'plain' is required as the baseline")
    for key in ("rank", "batch", "seq_len", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.threads < 0 or args.warmup < 0:
        parser.error(f"--threads and --warmup must be >= 0, got {args.threads} and {args.warmup}")

    if args.worker is not None:  # inside the subprocess
        row = worker(args.worker, model_name=args.model, rank=args.rank, batch=args.batch, seq_len=args.seq_len,
                     warmup=args.warmup, steps=args.steps, threads=args.threads)
        print(json.dumps(row))
        return 0

    print(f"DP-SGD step vs plain step: model {args.model}, LoRA rank {args.rank} on q_proj,v_proj, "
          f"batch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
          f"threads {args.threads or 'default'}")
    rows = [run_mode(mode, args) for mode in modes]
    plain = next(r for r in rows if r["mode"] == "plain")
    if "error" in plain:
        print("\n".join(table(rows)))
        return 1
    for row in rows:
        if "error" not in row:
            row["vs_plain_MB"] = row["peak_rss_MB"] - plain["peak_rss_MB"]
    print("\n".join(table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "rows": rows}, indent=1))
    return 0 if all(math.isfinite(r.get("step_s", math.nan)) for r in rows if "error" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())
