import json

import numpy as np
import pytest

import aggregation
from aggregation.serialize import from_tree, to_tree
from tests.aggregation.harness import UPLOADS, spec


def _equal(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("name", aggregation.names())
def test_every_aggregator_state_round_trips_bitwise(name):
    agg = aggregation.create(name)
    state = agg.init_state(spec(max_rank=4))
    state = agg.aggregate(state, UPLOADS[agg.uplink](1, [2, 4], alphas=[4.0, 8.0])).state  # what it uploads
    arrays: dict[str, np.ndarray] = {}
    tree = json.loads(json.dumps(to_tree(state, arrays)))  # must survive JSON
    assert _equal(from_tree(tree, arrays), state)


def test_foreign_classes_are_refused():
    with pytest.raises(ValueError, match="refusing"):
        from_tree({"__dataclass__": "os:system", "fields": {}}, {})
    with pytest.raises(TypeError, match="cannot serialise"):
        to_tree(object(), {})
