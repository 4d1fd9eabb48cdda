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
from aggregation.base import Tensors
from core.model import module_shapes
from core.presets import load_base
from core.config import RunConfig
from privacy.accounting import CentralBudgetExhausted
from privacy.settings import central_account, parse_run_config
from server.calibration import PublicSplit, public_split, server_public_init, uses_server_public
from server.db.session import open_database
from server.lora_sb_round import InitRequest, check_federated, initialise
from server.evaluate import ServerEvaluator
from server.polling import prompt
from server.recording import RecordingStrategy, RunRecorder
from server import checkpoint
from server.strategy import LoraStrategy
from server.threads import ThreadLimited
from server.tracking import tracked
from server.validation import UpdateLimits

app = ServerApp()

TRAIN_KEYS = ("local-steps", "batch-size", "learning-rate", "max-seq-len")


def build_evaluator(cfg: RunConfig, base, split: PublicSplit | None = None) -> ServerEvaluator | None:
    """On the evaluation part of the held-out examples only: never on Fed-SB's calibration part."""
    if cfg.eval_examples == 0:
        return None
    evaluation = (split or public_split(cfg)).evaluation
    return ServerEvaluator(
        model=base.model, tokenizer=base.tokenizer, examples=list(evaluation[: cfg.eval_examples]),
        max_len=cfg.max_seq_len,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config)
    recorder = tracked(RunRecorder(open_database(cfg.database_url)), cfg.mlflow_uri)  # MLflow: only with a URI
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
        # a checkpoint holds the initialised state: the init (Fed-SB's round 0) runs only without one
        strategy = build_strategy(cfg, recorder, run_id, grid=prompt(grid) if restored is None else None)
        if restored is not None:
            strategy.inner.restore(state=restored.state, merge_log=restored.merge_log, rng_state=restored.rng_state)
            strategy.round_offset = restored.round
            if strategy.central is not None:  # the user-level ε spent so far continues, not restarts
                strategy.central = strategy.central.restored(restored.privacy.get("central"), rounds=restored.round)
            log(INFO, "fedlora: resuming run %d after round %d", run_id, restored.round)
        strategy.resumed = bool(cfg.resume_run_id)
        remaining = cfg.num_server_rounds - strategy.round_offset
        if remaining > 0:
            strategy.start(grid=prompt(grid), initial_arrays=ArrayRecord(), num_rounds=remaining,
                           timeout=cfg.round_timeout)
    except KeyboardInterrupt:
        recorder.finish_run(run_id, status="interrupted", error="interrupted (SIGINT)")
        raise
    except CentralBudgetExhausted as exc:  # before the round that would pass it: its last checkpoint stands
        recorder.finish_run(run_id, status="stopped", error=str(exc))
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


def build_strategy(cfg: RunConfig, recorder: RunRecorder, run_id: int, grid: Grid | None = None) -> RecordingStrategy:
    """With ``grid``, the aggregator's init runs first (Fed-SB's LoRA-SB init) and is recorded."""
    base = load_base(cfg.model)
    log(INFO, "fedlora: model %s, aggregator %s, ranks %s", base.label, cfg.aggregator, cfg.rank_list)
    flower = cfg.to_flower()
    spec, split = model_spec(cfg, base.model), public_split(cfg)
    init = initialise(InitRequest(cfg=cfg, base=base, spec=spec, split=split, grid=grid)) if grid is not None else None
    if init is not None:
        recorder.record_init(run_id, kind=init.kind, seconds=init.seconds, bytes_down=init.bytes_down,
                             bytes_up=init.bytes_up, details=init.details)
    inner = LoraStrategy(
        aggregator=make_aggregator(cfg, base, calibrate=False, initial=init.initial if init else None),
        spec=spec,
        train_config={k: flower[k] for k in TRAIN_KEYS},
        clients_per_round=cfg.clients_per_round,
        min_clients=cfg.min_clients,
        limits=UpdateLimits(max_payload_bytes=int(cfg.max_payload_mb * 2**20),
                            max_norm_ratio=cfg.max_update_norm_ratio),
        round_retries=cfg.round_retries,
        on_insufficient=cfg.on_insufficient,
        round_timeout=cfg.round_timeout,
        fraction_evaluate=cfg.fraction_evaluate,
    )
    return RecordingStrategy(
        inner=inner, recorder=recorder, run_id=run_id, evaluator=build_evaluator(cfg, base, split), config=flower,
        eval_every=cfg.eval_every, node_eval_report=cfg.node_eval_report,
        checkpoint_dir=cfg.checkpoint_path, keep_checkpoints=cfg.keep_checkpoints, central=central_account(flower),
    )


def make_aggregator(cfg: RunConfig, base, *, calibrate: bool = True, initial: Tensors | None = None
                    ) -> aggregation.Aggregator:
    """The configured aggregator, its math under the server's thread limit; Fed-SB starts from ``initial``.

    ``initial``: the LoRA-SB init (``server.lora_sb_round.initialise``). Without it,
    ``calibrate=True`` computes the server-public one here when the run uses it;
    ``calibrate=False`` (the CLI's pre-start check, a resume) keeps the aggregator's own init.
    """
    kwargs = cfg.aggregator_kwargs
    if cfg.calibration_data and not aggregation.get_class(cfg.aggregator).accepts_calibration:
        takers = [n for n in aggregation.names() if aggregation.get_class(n).accepts_calibration]
        raise ValueError(f"calibration-data is only used by {', '.join(takers)}, not {cfg.aggregator!r}")
    if cfg.sb_init == "federated" and aggregation.get_class(cfg.aggregator).accepts_calibration:
        check_federated(cfg)  # refused before anything starts, not at round 0
    if initial is None and calibrate and uses_server_public(cfg):
        initial = server_public_init(cfg, base, public_split(cfg))
    if initial is not None:
        kwargs["initial"] = initial
    try:
        created = aggregation.create(cfg.aggregator, **kwargs)
    except TypeError as exc:
        raise ValueError(f"aggregator-options {cfg.aggregator_options!r} for {cfg.aggregator!r}: {exc}") from None
    if cfg.server_threads > 0:  # BLAS/OpenMP pools limited only while the method does its math
        created = ThreadLimited(inner=created, threads=cfg.server_threads)
    if cfg.dp_central_clip > 0:  # central DP: clipped uploads, Gaussian noise on the sum
        from privacy.central import CentralDP

        return CentralDP(inner=created, clip=cfg.dp_central_clip, noise_multiplier=cfg.dp_central_noise)
    return created


def model_spec(cfg: RunConfig, model) -> ModelSpec:
    return ModelSpec(modules=module_shapes(model, cfg.targets), max_rank=cfg.max_rank, seed=cfg.seed)
