"""Robust aggregation against hand computations: median, trimmed mean, Krum, norm bounding and
the example-count cap."""

import numpy as np
import pytest

from fleetune.edge_sdk.errors import ConfigError
from fleetune.server.config import ServerConfig, make_strategy
from fleetune.server.strategy import FedAvg, Krum, Median, TrimmedMean, Update

pytestmark = pytest.mark.unit
CURRENT = {"a": np.zeros(2, np.float32), "b": np.ones((1, 2), np.float32)}


def _updates(values, examples=None):
    examples = examples or [10] * len(values)
    return [
        Update(
            f"d{i}",
            n,
            delta={"a": np.full(2, v, np.float32), "b": np.full((1, 2), v, np.float32)},
        )
        for i, (v, n) in enumerate(zip(values, examples, strict=True))
    ]


def _no_seeds(seeds):
    raise AssertionError("no seeds expected")


def test_median_ignores_one_outlier_and_example_counts():
    out = Median().aggregate(CURRENT, _updates([1.0, 2.0, 100.0], [1, 1, 10**9]), _no_seeds)
    np.testing.assert_allclose(out.tensors["a"], 2.0)
    np.testing.assert_allclose(out.tensors["b"], 3.0)  # current 1 + median 2


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    out = TrimmedMean(trim=0.2).aggregate(CURRENT, _updates([1, 2, 3, 4, 100]), _no_seeds)
    np.testing.assert_allclose(out.tensors["a"], 3.0)  # mean of 2, 3, 4
    with pytest.raises(ConfigError, match="trim"):
        TrimmedMean(trim=0.5)


def test_krum_averages_the_updates_closest_to_the_others():
    values = [1.0, 1.1, 0.9, 1.05, 100.0]
    krum = Krum(byzantine=1)
    scores = krum.scores(np.array([[v, v, v, v] for v in values]))
    out = krum.aggregate(CURRENT, _updates(values), _no_seeds)
    assert int(np.argmax(scores)) == 4  # the outlier scores worst
    np.testing.assert_allclose(out.tensors["a"], np.mean(values[:4]), rtol=1e-6)


def test_norm_bound_clips_each_update_before_any_strategy():
    # one update of norm 10 (four coordinates of 5), clipped to norm 1: each coordinate 0.5
    fedavg = FedAvg(norm_bound=1.0).aggregate(CURRENT, _updates([5.0]), _no_seeds)
    median = Median(norm_bound=1.0).aggregate(CURRENT, _updates([5.0, 5.0, 5.0]), _no_seeds)
    np.testing.assert_allclose(fedavg.tensors["a"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(median.tensors["a"], 0.5, rtol=1e-6)
    assert fedavg.seeds is None


def test_an_absurd_example_count_is_capped():
    # 2**62 claimed examples weigh as max_examples = 10, as much as the honest device's 10
    out = FedAvg(max_examples=10).aggregate(CURRENT, _updates([3.0, -1.0], [2**62, 10]), _no_seeds)
    np.testing.assert_allclose(out.tensors["a"], 1.0)


def test_robust_strategies_replay_seed_updates_one_by_one():
    calls = []

    def replay(seeds):
        calls.append(dict(seeds))
        value = sum(seeds.values())
        return {"a": np.full(2, value, np.float32), "b": np.full((1, 2), value, np.float32)}

    updates = [Update(f"d{i}", 1, seeds={i: float(i)}) for i in range(3)]
    out = Median().aggregate(CURRENT, updates, replay)
    assert calls == [{0: 0.0}, {1: 1.0}, {2: 2.0}]
    np.testing.assert_allclose(out.tensors["a"], 1.0)


def test_the_server_config_builds_each_strategy_and_refuses_bad_knobs():
    for name, cls in (("median", Median), ("trimmed_mean", TrimmedMean), ("krum", Krum)):
        strategy = make_strategy(ServerConfig(strategy=name, norm_bound=2.0, max_examples=5))
        assert isinstance(strategy, cls) and strategy.norm_bound == 2.0
    assert make_strategy(ServerConfig(strategy="trimmed_mean", trim=0.1)).trim == 0.1
    for bad in ({"strategy": "mean"}, {"norm_bound": -1.0}, {"trim": 0.5}, {"max_examples": 0}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)
    for bad, says in (
        ({"mode": "later"}, "mode must be"),
        ({"mode": "async", "secagg": True}, "needs mode"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"clusters": 2, "cluster_assign": "nearest"}, "cluster_assign must be one of"),
    ):
        with pytest.raises(ConfigError, match=says):
            ServerConfig(**bad)
