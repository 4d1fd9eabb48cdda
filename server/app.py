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

import aggregation
from aggregation import ModelSpec
from client.data import load_examples, split_heldout
from client.model import module_shapes
from client.presets import load_base
from server.config import RunConfig
from server.db.session import open_database
from server.evaluate import ServerEvaluator, TimedEval
from server.recording import RecordingStrategy, RunRecorder
from server.strategy import LoraStrategy

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
    cfg = RunConfig.from_flower(context.run_config)
    recorder = RunRecorder(open_database(cfg.database_url))
    flower = cfg.to_flower()
    run_id = recorder.start_run(
        config=flower, aggregator=cfg.aggregator, model=cfg.model, tag=cfg.run_tag,
        flwr_run_id=getattr(context, "run_id", None),
    )
    try:
        strategy = build_strategy(cfg, recorder, run_id)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.num_server_rounds,
                       timeout=cfg.round_timeout)
    except BaseException as exc:
        recorder.finish_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    recorder.finish_run(run_id, status="completed")


def build_strategy(cfg: RunConfig, recorder: RunRecorder, run_id: int) -> RecordingStrategy:
    base = load_base(cfg.model)
    log(INFO, "fedlora: model %s, aggregator %s, ranks %s", base.label, cfg.aggregator, cfg.rank_list)
    flower = cfg.to_flower()
    inner = LoraStrategy(
        aggregator=aggregation.create(cfg.aggregator),
        spec=model_spec(cfg, base.model),
        train_config={k: flower[k] for k in TRAIN_KEYS},
        clients_per_round=cfg.clients_per_round,
        min_clients=cfg.min_clients,
        round_timeout=cfg.round_timeout,
    )
    return RecordingStrategy(inner=inner, recorder=recorder, run_id=run_id, evaluator=build_evaluator(cfg, base))


def model_spec(cfg: RunConfig, model) -> ModelSpec:
    return ModelSpec(modules=module_shapes(model, cfg.targets), max_rank=cfg.max_rank, seed=cfg.seed)
