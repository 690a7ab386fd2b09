import numpy as np
import pytest

from fleetune.edge_sdk.errors import AggregationError
from fleetune.server.strategy import FedAvg, Update

pytestmark = pytest.mark.unit


def _no_seeds(seeds):
    raise AssertionError("no seeds expected")


def test_fedavg_matches_hand_computation():
    # Prepare: global 1.0; deltas +3 (30 examples) and -1 (10 examples)
    current = {"w": np.ones((2, 2), dtype=np.float32)}
    updates = [
        Update("a", 30, delta={"w": np.full((2, 2), 3.0, dtype=np.float32)}),
        Update("b", 10, delta={"w": np.full((2, 2), -1.0, dtype=np.float32)}),
    ]
    # Execute
    out = FedAvg().aggregate(current, updates, replay=_no_seeds).tensors
    # Assert: 1 + (30*3 + 10*(-1)) / 40 = 3.0
    np.testing.assert_allclose(out["w"], 3.0)
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(current["w"], 1.0)  # the input is not modified


def test_fedavg_without_example_counts_is_a_plain_mean():
    current = {"w": np.zeros(3, dtype=np.float32)}
    updates = [
        Update("a", 0, delta={"w": np.array([1, 2, 3], np.float32)}),
        Update("b", 0, delta={"w": np.array([3, 2, 1], np.float32)}),
    ]
    np.testing.assert_allclose(
        FedAvg().aggregate(current, updates, _no_seeds).tensors["w"], [2, 2, 2]
    )


def test_fedavg_refuses_an_empty_round():
    with pytest.raises(AggregationError):
        FedAvg().aggregate({"w": np.zeros(1)}, [], _no_seeds)


def test_fedavg_merges_seeds_per_index_and_replays_once():
    # Prepare: two zeroth-order devices sharing seed 7
    calls = []

    def replay(seeds):
        calls.append(dict(seeds))
        return {"w": np.full(2, sum(seeds.values()), dtype=np.float32)}

    updates = [Update("a", 30, seeds={7: 1.0, 3: 2.0}), Update("b", 10, seeds={7: -1.0})]
    # Execute
    out = FedAvg().aggregate({"w": np.zeros(2, np.float32)}, updates, replay)
    # Assert: 7 → (30*1 + 10*(-1))/40 = 0.5, 3 → 30*2/40 = 1.5, replayed in one call
    assert calls == [{7: 0.5, 3: 1.5}]
    assert out.seeds == {7: 0.5, 3: 1.5}
    np.testing.assert_allclose(out.tensors["w"], [2.0, 2.0])


def test_mixed_dense_and_seed_updates_have_no_seed_downlink():
    updates = [Update("a", 1, seeds={1: 1.0}), Update("b", 1, delta={"w": np.ones(2, np.float32)})]
    replay = lambda seeds: {"w": np.full(2, seeds[1], dtype=np.float32)}  # noqa: E731
    out = FedAvg().aggregate({"w": np.zeros(2, np.float32)}, updates, replay)
    assert out.seeds is None
    np.testing.assert_allclose(out.tensors["w"], [1.0, 1.0])  # 0.5 * 1 (seed) + 0.5 * 1 (dense)


def test_a_stale_update_is_discounted_and_stale_seeds_replay_with_their_own_round():
    # Prepare: FedBuff's weight 1/sqrt(1 + staleness); a replay that records its round
    from fleetune.server.buffered import discount, staleness_weight

    rounds = []

    def replay(seeds, round_):
        rounds.append(round_)
        return {"w": np.full(2, sum(seeds.values()) * round_, np.float32)}

    fresh = Update("a", 10, seeds={3: 1.0}, round=5)
    late_seeds = Update("b", 10, seeds={3: 2.0}, round=4, staleness=3)
    late_dense = Update("c", 10, delta={"w": np.ones(2, np.float32)}, round=4, staleness=1)
    # Execute
    out = [discount(u, 5, 0.5, replay) for u in (fresh, late_seeds, late_dense)]
    # Assert: a fresh update unchanged; a late one scaled, its seeds replayed with round 4's pool
    assert staleness_weight(3, 0.5) == 0.5 and staleness_weight(0, 0.5) == 1.0
    assert out[0] is fresh
    assert out[1].seeds is None and rounds == [4]
    np.testing.assert_allclose(out[1].delta["w"], 0.5 * 2.0 * 4)
    np.testing.assert_allclose(out[2].delta["w"], 1 / np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("examples", [(30, 10, 0), (0, 0, 0)])
def test_a_running_sum_folds_what_fedavg_does(examples):
    """The running sum (plain server, workers) against FedAvg over the same updates,
    including updates that claim no examples: equal weights when none claims any."""
    from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
    from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
    from fleetune.server.strategy.fedavg import running_weight
    from fleetune.server.workers import Partial
    from tests.conftest import tiny_manifest

    spec, base = LoraSpec(r=2), tiny_manifest()
    layout, current = FlatLayout(spec, base), init_lora(spec, base)
    rng = np.random.default_rng(0)
    updates = [
        Update(
            f"d{i}",
            n,
            delta={k: rng.normal(size=v.shape).astype(np.float32) for k, v in current.items()},
        )
        for i, n in enumerate(examples)
    ]
    total = Partial(1, layout.size)
    for update in updates:
        total.add(update, running_weight(update.num_examples, 100_000), layout)
    folded = total.fold(current, layout, lambda seeds, round_: {})
    expected = FedAvg().aggregate(current, updates, _no_seeds).tensors
    assert folded is not None and folded.seeds is None
    for name, value in expected.items():
        np.testing.assert_allclose(folded.tensors[name], value, rtol=1e-5, atol=1e-6)


def test_a_running_sum_averages_each_tensor_over_the_updates_that_hold_it():
    """A full-depth update and a window update (the top layer of two): the window's tensors
    are their mean, the layer below moves by the full update alone; encoded, decoded and
    merged from two workers' sums, the same."""
    from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
    from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
    from fleetune.server.workers import Partial
    from tests.conftest import tiny_manifest

    spec, base = LoraSpec(r=2), tiny_manifest()
    layout, current = FlatLayout(spec, base), init_lora(spec, base)
    top = {n for n in current if ".layers.1." in n}
    full = Update("full", 30, delta={k: np.full_like(v, 2.0) for k, v in current.items()})
    window = Update("top", 10, delta={k: np.full_like(current[k], -2.0) for k in top})
    # Execute: one sum, and two workers' sums through the wire
    one = Partial(1, layout.size)
    for update in (full, window):
        one.add(update, float(update.num_examples), layout)
    merged = Partial(1, layout.size)
    for update in (full, window):
        part = Partial(1, layout.size)
        part.add(update, float(update.num_examples), layout)
        merged.merge(Partial.decode(part.encode("w"), layout.size)[1])
    # Assert: (30 x 2 - 10 x 2) / 40 = 1 in the window, 2 below it; a dense downlink
    for total in (one, merged):
        folded = total.fold(current, layout, lambda seeds, round_: {})
        assert folded is not None and folded.seeds is None
        for name, value in folded.tensors.items():
            np.testing.assert_allclose(
                value - current[name], 1.0 if name in top else 2.0, rtol=1e-6
            )
    assert one.cover is not None and Partial(1, layout.size).cover is None
