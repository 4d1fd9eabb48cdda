import json

import pytest

from core.data import Example, load_examples, partition, split_heldout


def _examples(n=60, categories=("a", "b", "c")):
    return [Example(f"q{i}", f"answer {i}", category=categories[i % len(categories)], source=f"f{i % 2}.jsonl") for i in range(n)]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "topic"])
def test_partitions_cover_every_example_once_and_are_deterministic(spec):
    ex = _examples()
    parts = partition(ex, spec, 3, seed=4)
    flat = [e for p in parts for e in p]
    assert sorted(flat, key=lambda e: e.prompt) == sorted(ex, key=lambda e: e.prompt)
    assert parts == partition(ex, spec, 3, seed=4)


def test_dirichlet_depends_on_seed_and_small_alpha_is_skewed():
    ex = _examples(300)
    a = partition(ex, "dirichlet:0.1", 3, seed=1)
    b = partition(ex, "dirichlet:0.1", 3, seed=2)
    assert a != b
    # with alpha=0.1 most clients are dominated by one category
    dominant = [max(sum(e.category == c for e in p) for c in "abc") / len(p) for p in a if p]
    assert max(dominant) > 0.6


def test_topic_partition_keeps_categories_whole():
    parts = partition(_examples(), "topic", 3, seed=0)
    assert [len({e.category for e in p}) for p in parts] == [1, 1, 1]


def test_file_partition_needs_one_client_per_file():
    assert len(partition(_examples(), "file", 2, seed=0)) == 2
    with pytest.raises(ValueError, match="2 files, 3 clients"):
        partition(_examples(), "file", 3, seed=0)


def test_bad_partition_specs_are_named():
    with pytest.raises(ValueError, match="'zipf:1'"):
        partition(_examples(), "zipf:1", 2, seed=0)
    with pytest.raises(ValueError, match="'abc'"):
        partition(_examples(), "dirichlet:abc", 2, seed=0)


def test_heldout_split_is_disjoint_and_stable():
    ex = _examples(100)
    train, held = split_heldout(ex, 0.1, seed=0)
    assert len(held) == 10 and not set(train) & set(held)
    assert (train, held) == split_heldout(list(reversed(ex)), 0.1, seed=0)


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
