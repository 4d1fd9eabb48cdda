"""Bad input fails before any training starts, naming the bad value."""

import time

import pytest

from server.cli import main


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--aggregator", "fedsgd"], "'fedsgd'"),
        (["--ranks", "4,0"], "rank 0"),
        (["--ranks", "4,128", "--max-rank", "64"], "rank 128"),
        (["--data", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (["--db", "postgresql+psycopg2://u:pw@127.0.0.1:1/x"], "127.0.0.1:1/x"),
        (["--model", "./no-such-model-dir"], "no-such-model-dir"),
        (["--partition", "file"], "files"),
    ],
)
def test_bad_input_fails_fast_with_the_value(tmp_path, capsys, args, needle):
    start = time.monotonic()
    code = main(["simulate", "--model", "tiny", "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path / "h"), *args])
    out = capsys.readouterr().out
    assert code == 2
    assert needle in out.replace("\n", "")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "h").exists()  # no SuperLink was ever started


def test_aggregator_that_cannot_fit_the_model_fails_before_flower_starts(tmp_path, capsys):
    # Fed-SB needs max-rank <= the smallest adapted dimension (the tiny model's is 32)
    code = main(["simulate", "--model", "tiny", "--aggregator", "fed-sb", "--max-rank", "64",
                 "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path / "h")])
    assert code == 2 and "max_rank is 64" in capsys.readouterr().out.replace("\n", "")
    assert not (tmp_path / "h").exists()
