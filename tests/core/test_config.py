import pytest

from core.config import RunConfig, parse_ranks


def test_defaults_are_valid_and_round_trip_through_flower_keys():
    cfg = RunConfig()
    assert RunConfig.from_flower(cfg.to_flower()) == cfg


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"aggregator": "nope"}, "'nope'"),
        ({"ranks": "4,0,8"}, "rank 0"),
        ({"ranks": "4,128", "max_rank": 64}, "rank 128"),
        ({"ranks": "4,x"}, "'x'"),
        ({"partition": "zipf"}, "'zipf'"),
        ({"num_server_rounds": 0}, "num-server-rounds"),
        ({"learning_rate": -1.0}, "-1.0"),
        ({"sb_init_lr": -0.5}, "sb-init-lr must be > 0"),
        ({"min_clients": 5, "clients_per_round": 2}, "min-clients (5)"),
    ],
)
def test_bad_values_are_named(kwargs, needle):
    with pytest.raises(ValueError) as err:
        RunConfig(**kwargs)
    assert needle in str(err.value)


def test_unknown_run_config_key_is_refused():
    with pytest.raises(ValueError, match="num-rounds"):
        RunConfig.from_flower({"num-rounds": 3})


def test_wrong_type_in_run_config_names_key_and_value():
    with pytest.raises(ValueError, match="local-steps.*'many'"):
        RunConfig.from_flower({"local-steps": "many"})


def test_ranks_cycle_over_partitions():
    cfg = RunConfig(ranks="2,4,8")
    assert [cfg.rank_for_partition(i) for i in range(5)] == [2, 4, 8, 2, 4]
    assert parse_ranks(" 4, 16") == (4, 16)


def test_unset_learning_rate_is_the_methods_recommendation_and_is_recorded():
    import aggregation

    for name in ("fedavg", "fed-sb"):
        cfg = RunConfig(aggregator=name)  # learning-rate's default 0: "the method's recommendation"
        assert cfg.learning_rate == aggregation.recommended(name).learning_rate
        assert cfg.to_flower()["learning-rate"] == cfg.learning_rate  # the run's record holds the number
    assert RunConfig(aggregator="fed-sb", learning_rate=0.5).learning_rate == 0.5  # explicit wins


def test_fed_sb_init_step_is_the_tuned_one_else_the_run_lr_unless_set_and_is_recorded():
    import aggregation

    cfg = RunConfig(aggregator="fed-sb", learning_rate=0.01)
    expected = aggregation.recommended("fed-sb").init_learning_rate or 0.01
    assert cfg.sb_init_lr == expected and cfg.to_flower()["sb-init-lr"] == expected
    tuned = RunConfig(aggregator="fed-sb", learning_rate=0.01, sb_init_lr=0.002)
    assert (tuned.learning_rate, tuned.sb_init_lr) == (0.01, 0.002)
    assert RunConfig.from_flower(tuned.to_flower()) == tuned  # the record reads back as the same run


def test_a_class_without_its_own_recommendation_gets_the_documented_default():
    import aggregation
    from aggregation.base import DEFAULT_RECOMMENDED

    class Bare:
        pass

    aggregation._REGISTRY["bare-test"] = Bare
    try:
        assert aggregation.recommended("bare-test") == DEFAULT_RECOMMENDED
    finally:
        del aggregation._REGISTRY["bare-test"]


@pytest.mark.parametrize("init_lr, expected", [(0.0, 0.05), (0.002, 0.002)])
def test_a_recommended_init_step_is_used_only_when_the_run_leaves_sb_init_lr_unset(monkeypatch, init_lr, expected):
    import aggregation
    from aggregation.base import Recommended

    fed_sb = aggregation.get_class("fed-sb")
    monkeypatch.setattr(fed_sb, "recommended", Recommended(learning_rate=0.05, source="test", init_learning_rate=init_lr),
                        raising=False)
    assert RunConfig(aggregator="fed-sb").sb_init_lr == expected  # 0: the training rate, as in LoRA-SB
    assert RunConfig(aggregator="fed-sb", sb_init_lr=0.3).sb_init_lr == 0.3  # the run's own wins
    with pytest.raises(ValueError, match="-1"):
        Recommended(learning_rate=0.05, source="test", init_learning_rate=-1)
