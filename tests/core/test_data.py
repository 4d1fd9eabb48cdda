import json
from collections import Counter

import pytest

from core.data import Example, load_examples, split_heldout


def _examples(n=60, categories=("a", "b", "c")):
    return [Example(f"q{i}", f"answer {i}", category=categories[i % len(categories)], source=f"f{i % 2}.jsonl") for i in range(n)]


def test_heldout_split_is_disjoint_and_stable():
    ex = _examples(100)
    train, held = split_heldout(ex, 0.1, seed=0)
    assert len(held) == 10 and not set(train) & set(held)
    assert (train, held) == split_heldout(list(reversed(ex)), 0.1, seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_heldout_cut_never_splits_copies_of_one_example(seed):
    # 22 examples three times each: round(66 * 0.2) = 13 falls inside a group, between the
    # boundaries at 12 and 15; the cut moves to the nearer one
    ex = [e for e in _examples(22) for _ in range(3)]
    train, held = split_heldout(ex, 0.2, seed=seed)
    assert not set(train) & set(held) and len(train) + len(held) == 66
    assert len(held) == 12
    assert len(split_heldout(_examples(66), 0.2, seed=seed)[1]) == 13  # no copies: the plain cut


def test_heldout_of_real_data_shares_no_content_with_training():
    ex = load_examples("chatterbot")
    assert len(set(ex)) < len(ex)  # the packaged data does repeat rows
    train, held = split_heldout(ex, 0.1, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == len(ex)
    most_copies = max(Counter(ex).values())
    assert abs(len(held) - round(len(ex) * 0.1)) <= most_copies / 2


def test_jsonl_loading_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}) + "\n")
    (ex,) = load_examples(str(path))
    assert ex.prompt == "Say hi\n\nto Bob" and ex.response == "Hi Bob"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1.*'output'"):
        load_examples(str(bad))


def test_packaged_chatterbot_has_topics():
    ex = load_examples("chatterbot")
    assert len(ex) > 2000 and len({e.category for e in ex}) == 21


@pytest.mark.parametrize("line, kind", [("[1, 2, 3]", "an array"), ('"just text"', "a string"), ("null", "null"),
                                        ("42", "a number")])
def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, line, kind):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"rows.jsonl:2: expected a JSON object.*got {kind}"):
        load_examples(str(path))


def test_a_non_utf8_jsonl_file_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:3: not UTF-8 text \(byte 0xe9 at column 21\)"):
        load_examples(str(path))


def test_crlf_jsonl_still_loads(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\r\n\r\n{"instruction": "r", "output": "b"}\r\n')
    assert [e.response for e in load_examples(str(path))] == ["a", "b"]


def test_hf_loader_reads_a_local_dataset_on_the_pinned_datasets(tmp_path, monkeypatch):
    # the ``hf:`` path through datasets 4.x's load_dataset, offline: a local directory of JSON lines
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ds").mkdir()
    rows = [{"instruction": "q1", "output": "a1", "category": "x"},
            {"instruction": "q2", "input": "ctx", "output": "a2"}]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for spec in (f"hf:{tmp_path / 'ds'}", f"hf:{tmp_path / 'ds'}:train"):
        ex = load_examples(spec)
        assert [(e.prompt, e.response, e.category) for e in ex] == [("q1", "a1", "x"), ("q2\n\nctx", "a2", "")]
