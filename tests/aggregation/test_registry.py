import pytest

import aggregation
from aggregation import create, names, register


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create("no-such-method")
    assert "no-such-method" in str(err.value)
    for name in names():
        assert name in str(err.value)


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="fedavg"):

        @register("fedavg")
        class Other:  # pragma: no cover - never registered
            pass


def test_every_registered_class_satisfies_the_protocol():
    for name in names():
        assert isinstance(create(name), aggregation.Aggregator), name
