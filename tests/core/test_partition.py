"""Partitions come from flwr-datasets' partitioners, under our seed; bad specs list the valid forms."""

import numpy as np
import pytest
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from core.config import RunConfig
from core.data import Example, partition
from core.partition import valid_forms

SEED = 7


def _examples(n=60, categories=("a", "b", "c")):
    return [Example(f"q{i}", f"answer {i}", category=categories[i % len(categories)], source=f"f{i % 2}.jsonl")
            for i in range(n)]


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


# --- the same partitions as flwr-datasets' own pipeline ----------------------------------------


def _flwr_datasets(partitioner, examples, seed):
    """FederatedDataset's steps on a table of our rows: shuffle with the seed, partition, read back."""
    table = Dataset.from_dict({"prompt": [e.prompt for e in examples], "category": [e.category for e in examples],
                               "source": [e.source for e in examples]}).shuffle(seed=seed)
    partitioner.dataset = table
    return [partitioner.load_partition(i)["prompt"] for i in range(partitioner.num_partitions)]


CATEGORIES = ("a", "b", "c", "d", "e")


@pytest.mark.parametrize("spec, clients, reference", [
    ("iid", 4, lambda: IidPartitioner(num_partitions=4)),
    # min_partition_size=1 is ours (flwr's default is 10; see core/partition.py)
    ("dirichlet:0.3", 4, lambda: DirichletPartitioner(num_partitions=4, partition_by="category", alpha=0.3,
                                                      min_partition_size=1, seed=SEED)),
    ("pathological:2", 4, lambda: PathologicalPartitioner(num_partitions=4, partition_by="category",
                                                          num_classes_per_partition=2, seed=SEED)),
    ("shard:2", 4, lambda: ShardPartitioner(num_partitions=4, partition_by="category", num_shards_per_partition=2,
                                            seed=SEED)),
    ("topic", len(CATEGORIES), lambda: NaturalIdPartitioner(partition_by="category")),
    ("file", 2, lambda: NaturalIdPartitioner(partition_by="source")),
])
def test_partitions_equal_flwr_datasets_for_the_same_seed(spec, clients, reference):
    ex = _examples(203, CATEGORIES)
    ours = [[e.prompt for e in p] for p in partition(ex, spec, clients, seed=SEED)]
    assert ours == _flwr_datasets(reference(), ex, SEED)
    assert len(ours) == clients and all(ours)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "pathological:2", "shard:2"])
def test_seeded_specs_change_with_the_seed(spec):
    ex = _examples(203, CATEGORIES)
    assert partition(ex, spec, 4, seed=1) != partition(ex, spec, 4, seed=2)


def test_iid_draws_the_permutation_the_earlier_code_drew():
    # default_rng(seed).permutation cut into array_split shares: runs made before the
    # move to flwr-datasets get the same iid clients
    ex = _examples(50)
    expected = [[ex[i] for i in chunk] for chunk in np.array_split(np.random.default_rng(3).permutation(50), 4)]
    assert partition(ex, "iid", 4, seed=3) == expected


def test_topic_deals_whole_categories_round_robin_when_clients_are_fewer():
    # ours, not NaturalIdPartitioner's one-client-per-category: client i takes categories i, i+n, ...
    parts = partition(_examples(100, CATEGORIES), "topic", 2, seed=0)
    assert [sorted({e.category for e in p}) for p in parts] == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ValueError, match=r"leaves partitions \[5\] of 6 empty"):
        partition(_examples(100, CATEGORIES), "topic", 6, seed=0)


def test_pathological_and_shard_give_what_they_say():
    ex = _examples(200, CATEGORIES)
    assert [len({e.category for e in p}) for p in partition(ex, "pathological:2", 4, seed=0)] == [2, 2, 2, 2]
    shards = partition(ex, "shard:2", 4, seed=0)
    assert [len(p) for p in shards] == [50, 50, 50, 50]  # 8 shards of 200 // 8 rows
    assert len({e.prompt for p in shards for e in p}) == 200


@pytest.mark.parametrize("spec, message", [
    ("zipf:1", "unknown partition 'zipf:1'"),
    ("dirichlet:abc", "ALPHA must be a number, got 'abc'"),
    ("dirichlet:0", "ALPHA must be > 0"),
    ("dirichlet:nan", "ALPHA must be > 0 and finite"),
    ("pathological", "must be a whole number >= 1, got ''"),
    ("pathological:1.5", "got '1.5'"),
    ("shard:0", "shard N \\(shards per client\\) must be >= 1, got 0"),
    ("iid:2", "takes no argument, got '2'"),
])
def test_a_bad_spec_is_named_with_the_valid_forms(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        partition(_examples(), spec, 2, seed=0)
    assert valid_forms() == "iid, dirichlet:ALPHA, topic, pathological:K, shard:N, file"
    assert valid_forms() in str(caught.value) and repr(spec) in str(caught.value)
    with pytest.raises(ValueError, match=message):  # refused with the run config, before any client trains
        RunConfig(partition=spec)


def test_a_spec_the_data_cannot_meet_names_the_spec_and_the_reason():
    with pytest.raises(ValueError, match="partition 'pathological:4' of 60 examples over 3 clients: .*greater than"):
        partition(_examples(), "pathological:4", 3, seed=0)
    with pytest.raises(ValueError, match="partition .shard:20. of 60 examples over 4 clients: "
                                         "4 clients x 20 shards need at least 80"):
        partition(_examples(), "shard:20", 4, seed=0)
