"""Kill the whole coordinator stack with SIGKILL mid-run, resume, compare with a clean run.

What is killed: the ``fedlora simulate`` process and every process under it (the
SuperLink, its SuperExec, the flwr-simulation process that runs the ServerApp, and
Ray's workers), all with SIGKILL, as a power loss would. What must come back: the
same rounds, no duplicate rows, and a final global state *bitwise* equal to an
uninterrupted run of the same seed. Bitwise is expected on CPU: clients are seeded
by their stable node key and round, every process folds base updates in the same
order in float32, and sampling continues from the checkpointed RNG state.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import checkpoint as ckpt
from cli.app import main
from server.db.models import (
    CheckpointRecord,
    ClientUpdateRecord,
    Evaluation,
    RoundRecord,
    Run,
)
from server.db.session import open_database

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

ARGS = ["simulate", "--model", "tiny", "--max-rank", "16", "--aggregator", "flora", "--num-clients", "3",
        "--clients-per-round", "2", "--ranks", "2,4,8", "--rounds", "4", "--local-steps", "2", "--lr", "0.05",
        "--eval-examples", "8", "--max-seq-len", "48", "--seed", "3"]


def _final_checkpoint(db: str, run_id: int) -> ckpt.Checkpoint:
    with Session(open_database(db)) as s:
        row = s.scalars(select(CheckpointRecord).where(CheckpointRecord.run_id == run_id)
                        .order_by(CheckpointRecord.round_number.desc())).first()
        return ckpt.load(Path(row.path), row.sha256)


def _wait_for_round_one(engine, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(engine) as s:
            if s.scalar(select(func.count()).select_from(RoundRecord)) >= 1:
                return
        time.sleep(0.2)
    pytest.fail("round 1 never completed")


def _kill_tree(pid: int) -> list[str]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    names = [" ".join(p.cmdline()[:2]) for p in procs if p.is_running()]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return names


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    clean_db = f"sqlite:///{tmp_path}/clean.db"
    assert main([*ARGS, "--db", clean_db, "--home", str(tmp_path / "h1"), "--checkpoint-dir", str(tmp_path / "c1")]) == 0

    db = f"sqlite:///{tmp_path}/killed.db"
    cmd = [sys.executable, "-m", "cli", *ARGS, "--db", db, "--home", str(tmp_path / "h2"),
           "--checkpoint-dir", str(tmp_path / "c2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        engine = open_database(db)
        _wait_for_round_one(engine)  # kill once round 1 is committed, during round 2
        killed = _kill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any("flwr-simulation" in k for k in killed), killed

    with Session(engine) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "running"  # nobody could record anything
        # tiny rounds take about a second: the kill lands somewhere after round 1, before the end
        committed = s.scalar(select(func.count()).select_from(RoundRecord))
        assert 1 <= committed < 4, committed
        run_id = run.id

    assert main(["resume", str(run_id), "--db", db, "--home", str(tmp_path / "h3")]) == 2  # refuses without --force
    assert main(["resume", str(run_id), "--db", db, "--home", str(tmp_path / "h3"), "--force"]) == 0

    with Session(engine) as s:
        run = s.get(Run, run_id)
        assert run.status == "completed"
        assert [r.number for r in s.scalars(select(RoundRecord).order_by(RoundRecord.number))] == [1, 2, 3, 4]
        per_round = s.execute(select(ClientUpdateRecord.round_number, func.count())
                              .group_by(ClientUpdateRecord.round_number)).all()
        assert sorted(per_round) == [(1, 2), (2, 2), (3, 2), (4, 2)]  # the killed round left no rows, none twice
        resumed_evals = sorted(e.round_number for e in s.scalars(select(Evaluation)))

    with Session(open_database(clean_db)) as s:
        clean_id = s.scalars(select(Run)).one().id
        clean_evals = sorted(e.round_number for e in s.scalars(select(Evaluation)))
    # the same evaluation schedule (round 0, every eval-every-th round, the last), none twice
    assert resumed_evals == clean_evals and clean_evals[0] == 0 and clean_evals[-1] == 4, (resumed_evals, clean_evals)
    clean, resumed = _final_checkpoint(clean_db, clean_id), _final_checkpoint(db, run_id)
    assert clean.round == resumed.round == 4
    assert [r for r, _ in clean.merge_log] == [r for r, _ in resumed.merge_log] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(clean.merge_log, resumed.merge_log):
        for module in a:
            for factor in a[module]:
                assert np.array_equal(a[module][factor], b[module][factor]), (module, factor)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def test_sigterm_stops_every_process_and_leaves_a_resumable_run(tmp_path):
    # docker stop / a CI cancel: SIGTERM to the CLI alone must take the SuperLink, the
    # simulation and Ray down with it, and mark the run as interrupted (not "running")
    db = f"sqlite:///{tmp_path}/term.db"
    args = [a if a != "4" else "200" for a in ARGS]  # far more rounds than the test waits for
    cmd = [sys.executable, "-m", "cli", *args, "--db", db, "--home", str(tmp_path / "h"),
           "--checkpoint-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        engine = open_database(db)
        _wait_for_round_one(engine)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("flower-superlink" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 128 + signal.SIGTERM, output
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    with Session(engine) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "interrupted" and "SIGTERM" in run.error
        assert s.scalar(select(func.count()).select_from(RoundRecord)) < 200
    assert f"fedlora resume {run.id}" in output
