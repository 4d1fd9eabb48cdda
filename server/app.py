"""ServerApp: run config -> aggregator -> strategy -> recording wrapper -> start.

Everything that can be checked is checked before a single client trains: the run
config (names the bad key and value), the database URL (connects at once), the model
and the evaluation data.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from logging import INFO
from pathlib import Path

import aggregation
from aggregation import ModelSpec
from core.data import load_examples, split_heldout
from core.model import module_shapes
from core.presets import load_base
from core.config import RunConfig
from privacy.settings import parse_run_config
from server.db.session import open_database
from server.evaluate import ServerEvaluator, TimedEval
from server.recording import RecordingStrategy, RunRecorder
from server import checkpoint
from server.strategy import LoraStrategy
from server.validation import UpdateLimits

app = ServerApp()

TRAIN_KEYS = ("local-steps", "batch-size", "learning-rate", "max-seq-len")


def build_evaluator(cfg: RunConfig, base) -> callable:
    if cfg.eval_examples == 0:
        return lambda _strategy: None
    _, heldout = split_heldout(load_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    evaluator = ServerEvaluator(
        model=base.model, tokenizer=base.tokenizer, examples=heldout[: cfg.eval_examples], max_len=cfg.max_seq_len
    )

    def run(strategy: LoraStrategy) -> TimedEval:
        return evaluator(strategy.merge_log, strategy.aggregator.global_delta(strategy.state))

    return run


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config)
    recorder = RunRecorder(open_database(cfg.database_url))
    flower = cfg.to_flower()
    if cfg.resume_run_id:
        run, latest = recorder.reopen_run(cfg.resume_run_id)
        run_id = run.id
    else:
        run_id = recorder.start_run(
            config=flower, aggregator=cfg.aggregator, model=cfg.model, tag=cfg.run_tag,
            flwr_run_id=getattr(context, "run_id", None),
        )
        latest = None
    try:
        if cfg.resume_run_id:  # inside the try: a refused resume is recorded, not left "running"
            _check_same_run(run.config, flower, run_id)
        restored = None
        if latest is not None:
            restored = checkpoint.load(Path(latest.path), latest.sha256)
            # `fedlora resume` checks this first; a submission with resume-run-id (or a
            # row edited since) reaches only this check, before any model is loaded
            checkpoint.check_resumable(restored, flower, run_id=run_id, path=Path(latest.path),
                                       source="the submitted run config")
        strategy = build_strategy(cfg, recorder, run_id)
        if restored is not None:
            strategy.inner.restore(state=restored.state, merge_log=restored.merge_log, rng_state=restored.rng_state)
            strategy.round_offset = restored.round
            log(INFO, "fedlora: resuming run %d after round %d", run_id, restored.round)
        strategy.resumed = bool(cfg.resume_run_id)
        remaining = cfg.num_server_rounds - strategy.round_offset
        if remaining > 0:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=cfg.round_timeout)
    except KeyboardInterrupt:
        recorder.finish_run(run_id, status="interrupted", error="interrupted (SIGINT)")
        raise
    except BaseException as exc:
        recorder.finish_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    recorder.finish_run(run_id, status="completed")


def _check_same_run(recorded: dict, requested: dict, run_id: int) -> None:
    """A resumed run must be the same experiment: only volatile keys may differ."""
    if checkpoint.config_hash(recorded) == checkpoint.config_hash(requested):
        return
    raise ValueError(f"cannot resume run {run_id} with a different config "
                     f"({checkpoint.describe_differences(recorded, requested)})")


def build_strategy(cfg: RunConfig, recorder: RunRecorder, run_id: int) -> RecordingStrategy:
    base = load_base(cfg.model)
    log(INFO, "fedlora: model %s, aggregator %s, ranks %s", base.label, cfg.aggregator, cfg.rank_list)
    flower = cfg.to_flower()
    inner = LoraStrategy(
        aggregator=make_aggregator(cfg, base),
        spec=model_spec(cfg, base.model),
        train_config={k: flower[k] for k in TRAIN_KEYS},
        clients_per_round=cfg.clients_per_round,
        min_clients=cfg.min_clients,
        limits=UpdateLimits(max_payload_bytes=int(cfg.max_payload_mb * 2**20),
                            max_norm_ratio=cfg.max_update_norm_ratio),
        round_retries=cfg.round_retries,
        on_insufficient=cfg.on_insufficient,
        round_timeout=cfg.round_timeout,
    )
    return RecordingStrategy(
        inner=inner, recorder=recorder, run_id=run_id, evaluator=build_evaluator(cfg, base), config=flower,
        checkpoint_dir=cfg.checkpoint_path, keep_checkpoints=cfg.keep_checkpoints,
    )


def make_aggregator(cfg: RunConfig, base, *, calibrate: bool = True) -> aggregation.Aggregator:
    """The configured aggregator; Fed-SB gets its LoRA-SB init from public calibration data.

    ``calibrate=False`` (the CLI's pre-start check) builds it without running the
    calibration, which the ServerApp runs once for real.
    """
    kwargs = cfg.aggregator_kwargs
    if cfg.calibration_data and not aggregation.get_class(cfg.aggregator).accepts_calibration:
        takers = [n for n in aggregation.names() if aggregation.get_class(n).accepts_calibration]
        raise ValueError(f"calibration-data is only used by {', '.join(takers)}, not {cfg.aggregator!r}")
    if cfg.calibration_data and calibrate:
        import copy

        from server.calibration import lora_sb_calibration

        kwargs["initial"] = lora_sb_calibration(
            copy.deepcopy(base.model), base.tokenizer, load_examples(cfg.calibration_data),
            targets=cfg.targets, rank=cfg.max_rank, learning_rate=cfg.learning_rate,
            num_batches=cfg.calibration_batches, batch_size=cfg.batch_size, max_len=cfg.max_seq_len, seed=cfg.seed,
        )
    try:
        created = aggregation.create(cfg.aggregator, **kwargs)
    except TypeError as exc:
        raise ValueError(f"aggregator-options {cfg.aggregator_options!r} for {cfg.aggregator!r}: {exc}") from None
    if cfg.dp_central_clip > 0:  # central DP: clipped uploads, Gaussian noise on the sum
        from privacy.central import CentralDP

        return CentralDP(inner=created, clip=cfg.dp_central_clip, noise_multiplier=cfg.dp_central_noise)
    return created


def model_spec(cfg: RunConfig, model) -> ModelSpec:
    return ModelSpec(modules=module_shapes(model, cfg.targets), max_rank=cfg.max_rank, seed=cfg.seed)
