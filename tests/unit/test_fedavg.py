import numpy as np
import pytest

from edge_sdk.errors import AggregationError
from server.strategy import FedAvg, Update

pytestmark = pytest.mark.unit


def test_fedavg_matches_hand_computation():
    # Prepare: global 1.0; deltas +3 (30 examples) and -1 (10 examples)
    current = {"w": np.ones((2, 2), dtype=np.float32)}
    updates = [
        Update("a", 30, {"w": np.full((2, 2), 3.0, dtype=np.float32)}),
        Update("b", 10, {"w": np.full((2, 2), -1.0, dtype=np.float32)}),
    ]
    # Execute
    out = FedAvg().aggregate(current, updates)
    # Assert: 1 + (30*3 + 10*(-1)) / 40 = 3.0
    np.testing.assert_allclose(out["w"], 3.0)
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(current["w"], 1.0)  # the input is not modified


def test_fedavg_without_example_counts_is_a_plain_mean():
    current = {"w": np.zeros(3, dtype=np.float32)}
    updates = [
        Update("a", 0, {"w": np.array([1, 2, 3], np.float32)}),
        Update("b", 0, {"w": np.array([3, 2, 1], np.float32)}),
    ]
    np.testing.assert_allclose(FedAvg().aggregate(current, updates)["w"], [2, 2, 2])


def test_fedavg_refuses_an_empty_round():
    with pytest.raises(AggregationError):
        FedAvg().aggregate({"w": np.zeros(1)}, [])
