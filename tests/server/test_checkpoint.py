from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import aggregation
from aggregation.base import ModelSpec
from core.model import module_shapes
from core.presets import load_base
from server import checkpoint as ckpt
from server.db.models import CheckpointRecord, Run
from server.db.session import open_database
from server.recording import RecordingStrategy, RunRecorder
from server.rounds import RoundReport
from tests.aggregation.harness import random_updates, spec


def _checkpoint(round_=3):
    agg = aggregation.create("fedex-lora")
    state = agg.init_state(spec(max_rank=4))
    result = agg.aggregate(state, random_updates(0, [2, 4], alphas=[4.0, 8.0]))
    rng = np.random.default_rng(5)
    rng.random(7)
    return ckpt.Checkpoint(round=round_, aggregator="fedex-lora", state=result.state,
                           merge_log=[(1, result.base_update), (2, result.base_update)],
                           rng_state=rng.bit_generator.state, config={"aggregator": "fedex-lora", "seed": 0})


def test_save_load_round_trip_is_bitwise(tmp_path):
    original = _checkpoint()
    path, sha = ckpt.save(original, tmp_path / "run-7")
    loaded = ckpt.load(path, sha)
    assert loaded.round == 3 and loaded.config == original.config
    for name, f in original.state.factors.items():
        for k, v in f.items():
            assert np.array_equal(loaded.state.factors[name][k], v)
    assert [r for r, _ in loaded.merge_log] == [1, 2]
    a = np.random.default_rng(); a.bit_generator.state = original.rng_state
    b = np.random.default_rng(); b.bit_generator.state = loaded.rng_state
    assert np.array_equal(a.random(5), b.random(5))  # sampling continues identically
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    path, sha = ckpt.save(_checkpoint(), tmp_path / "run-1")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load(path, sha)


def test_config_hash_ignores_only_volatile_keys():
    base = {"aggregator": "flora", "seed": 1, "db-url": "sqlite:///a", "resume-run-id": 0}
    assert ckpt.config_hash(base) == ckpt.config_hash({**base, "db-url": "postgresql://x", "resume-run-id": 4})
    assert ckpt.config_hash(base) != ckpt.config_hash({**base, "seed": 2})


# --- run directories: two databases sharing one checkpoint root (issue 11, item 4) ------------


@dataclass
class _Inner:
    """What RecordingStrategy reads from its LoraStrategy at the end of a round."""

    state: object
    merge_log: list
    rng: np.random.Generator
    last_report: RoundReport | None = None


def _fedavg_state(seed: int):
    # the tiny model's own modules, so that the checkpoint exports
    modules = module_shapes(load_base("tiny").model, ("q_proj", "v_proj"))
    base = aggregation.create("fedavg").init_state(ModelSpec(modules=modules, max_rank=4, seed=seed))
    rng = np.random.default_rng(seed)
    return type(base)(factors={m: {k: rng.normal(size=v.shape) for k, v in f.items()} for m, f in base.factors.items()},
                      max_rank=4)


def _recording(db: str, root, *, seed: int, keep: int) -> tuple[RunRecorder, RecordingStrategy]:
    recorder = RunRecorder(open_database(db))
    config = {"aggregator": "fedavg", "model": "tiny", "target-modules": "q_proj,v_proj", "seed": seed}
    run_id = recorder.start_run(config=config, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    inner = _Inner(state=_fedavg_state(seed), merge_log=[], rng=np.random.default_rng(seed))
    return recorder, RecordingStrategy(inner=inner, recorder=recorder, run_id=run_id, evaluator=None,
                                       config=config, checkpoint_dir=root, keep_checkpoints=keep)


def _finish_round(strategy: RecordingStrategy, number: int) -> None:
    now = datetime(2026, 1, 1)
    strategy.inner.last_report = RoundReport(number=number, started_at=now, finished_at=now, outcomes=(),
                                             aggregated=True, train_loss=None, relative_error=None,
                                             aggregate_seconds=0.0)
    strategy._end_of_round(number, ArrayRecord())  # what Flower calls after each round


def _latest(db: str, run_id: int) -> CheckpointRecord:
    with Session(open_database(db)) as s:
        return s.scalars(select(CheckpointRecord).where(CheckpointRecord.run_id == run_id)
                         .order_by(CheckpointRecord.round_number.desc())).first()


def test_two_databases_sharing_the_checkpoint_root_are_both_exportable(tmp_path):
    # both databases number their run 1; before run directories were keyed by uuid they
    # wrote the same run-1/round-00001.npz and the first one's export failed on its sha256
    from server.export import export_run

    root = tmp_path / "runs" / "checkpoints"
    dbs = [f"sqlite:///{tmp_path}/c{i}.db" for i in (1, 2)]
    strategies = [_recording(db, root, seed=i, keep=1)[1] for i, db in enumerate(dbs)]
    assert [s.run_id for s in strategies] == [1, 1]
    for number in (1, 2):
        for strategy in strategies:
            _finish_round(strategy, number)
    for db, strategy in zip(dbs, strategies):
        row = _latest(db, 1)
        loaded = ckpt.load(Path(row.path), row.sha256)  # its own bytes, nobody else's
        for name, f in strategy.inner.state.factors.items():
            assert np.array_equal(loaded.state.factors[name]["A"], f["A"])
        assert not (Path(row.path).parent / "round-00001.npz").exists()  # keep=1 still prunes its own file
        result = export_run(db, 1, tmp_path / f"out-{Path(db).stem}")
        assert result.kind == "adapter"
    assert len({_latest(db, 1).path for db in dbs}) == 2


def test_pruning_never_deletes_a_file_another_run_rewrote(tmp_path):
    # runs recorded before the uuid column existed keep run-<id>: two such runs in two
    # databases still share files. Run A pruning its round 1 must leave B's round 1 alone.
    root = tmp_path / "ckpt"
    dbs = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
    a, b = (_recording(db, root, seed=i, keep=1)[1] for i, db in enumerate(dbs))
    for db in dbs:
        with open_database(db).begin() as conn:
            conn.execute(update(Run).values(uuid=None))  # as the schema upgrade leaves old runs
    _finish_round(a, 1)
    _finish_round(b, 1)  # overwrites a's round-1 file: the same path, as before the fix
    _finish_round(a, 2)  # prunes a's round 1: that file now holds b's checkpoint
    row = _latest(dbs[1], 1)
    assert row.path == str(root / "run-1" / "round-00001.npz")
    assert ckpt.load(Path(row.path), row.sha256).round == 1


def test_a_legacy_run_keeps_its_directory_and_a_new_one_is_keyed_by_its_uuid(tmp_path):
    assert ckpt.run_directory(tmp_path, run_id=3, run_uuid=None) == tmp_path / "run-3"
    assert ckpt.run_directory(tmp_path, run_id=3, run_uuid="ab12") == tmp_path / "run-3-ab12"


def test_discard_deletes_only_the_bytes_it_was_told_about(tmp_path):
    path, sha = ckpt.save(_checkpoint(), tmp_path / "run-1")
    assert not ckpt.discard(path, "0" * 64) and path.exists()
    assert ckpt.discard(path, sha) and not path.exists()
    assert not ckpt.discard(path, sha)  # already gone: nothing to do


def test_an_unreadable_file_is_a_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "round-00001.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ckpt.CheckpointError, match="round-00001.npz"):
        ckpt.load(path)
    assert issubclass(ckpt.CheckpointError, ValueError)  # the CLI prints it as one line, exit 2


def test_pruning_keeps_a_file_that_another_row_of_the_database_references(tmp_path):
    db = f"sqlite:///{tmp_path}/one.db"
    recorder, a = _recording(db, tmp_path / "ckpt", seed=0, keep=1)
    other = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    _finish_round(a, 1)
    shared = _latest(db, a.run_id)
    with Session(recorder.engine) as s, s.begin():  # e.g. a copied run pointing at the same file
        s.add(CheckpointRecord(run_id=other, round_number=1, path=shared.path, sha256=shared.sha256,
                               config_hash=shared.config_hash, created_at=datetime(2026, 1, 1)))
    _finish_round(a, 2)
    assert ckpt.load(Path(shared.path), shared.sha256).round == 1


def test_the_privacy_accounts_round_trip_and_an_older_checkpoint_has_none(tmp_path):
    import dataclasses
    import json

    original = dataclasses.replace(_checkpoint(), privacy={"central": {"accountant": "prv",
                                                                       "history": [[1.1, 0.4, 3]]}})
    path, sha = ckpt.save(original, tmp_path / "run-1")
    assert ckpt.load(path, sha).privacy == original.privacy
    # a checkpoint written before the accounts were kept has no "privacy" in its header
    with np.load(path) as npz:
        header = json.loads(npz["__header__"].tobytes().decode())
        arrays = {k: npz[k] for k in npz.files if k != "__header__"}
    del header["privacy"]
    old = tmp_path / "old.npz"
    np.savez(old, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    loaded = ckpt.load(old)
    assert loaded.privacy == {} and loaded.round == original.round


def test_a_run_recorded_before_a_key_existed_resumes_when_the_key_is_at_its_default():
    from server.checkpoint import config_differences, config_hash

    from core.config import RunConfig

    current = RunConfig(model="tiny").to_flower()
    old = {k: v for k, v in current.items() if k != "eval-every"}  # written by an older fedlora
    assert config_hash(old) == config_hash(current) and config_differences(old, current) == []
    changed = {**current, "eval-every": current["eval-every"] + 1}
    assert config_differences(old, changed) == ["eval-every"]  # a real change is still refused
