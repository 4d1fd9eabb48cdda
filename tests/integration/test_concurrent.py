"""Two ``fedlora simulate`` started from one directory at the same time both finish.

Each writes its own Flower connection config and SuperLink state; a shared
``.flwr/config.toml`` used to be rewritten by the second run, whose SuperLink then
received the first run's submission (or none at all).
"""

import subprocess
import sys

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import Run
from server.db.session import open_database

pytestmark = pytest.mark.integration

ARGS = ["simulate", "--model", "tiny", "--num-clients", "2", "--clients-per-round", "2", "--rounds", "1",
        "--ranks", "2,4", "--max-rank", "8", "--batch-size", "2", "--max-seq-len", "32", "--eval-examples", "4",
        "--local-steps", "1"]


def test_two_simulations_in_one_directory_both_complete(tmp_path):
    procs = []
    for name in ("a", "b"):
        command = [sys.executable, "-m", "cli", *ARGS, "--db", f"sqlite:///{tmp_path}/{name}.db"]
        log = open(tmp_path / f"{name}.out", "wb")
        procs.append((name, subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)))
        log.close()
    for name, proc in procs:
        code = proc.wait(timeout=600)
        out = (tmp_path / f"{name}.out").read_text(errors="replace")
        assert code == 0, out
        with Session(open_database(f"sqlite:///{tmp_path}/{name}.db")) as s:
            (run,) = s.scalars(select(Run)).all()
            assert run.status == "completed" and len(run.rounds) == 1, out
    # both links cleaned their own Flower homes up; the logs stay
    assert list((tmp_path / ".flwr" / "links").iterdir()) == []
    assert len(list((tmp_path / ".flwr" / "logs").glob("superlink-link-*.log"))) == 2
