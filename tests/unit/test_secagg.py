"""Secure aggregation's pairwise masks: each upload alone looks random, the sum is exact, and
one device that drops after masking is recovered from the survivors' seeds."""

import numpy as np
import pytest

from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.secagg import MaskingKey, masked_update, pair_seed, unmask_sum

pytestmark = pytest.mark.unit
BOUND, SCALE, SIZE = 1.0, 2.0**20, 50_000


def _fleet(n: int):
    rng = np.random.default_rng(0)
    keys = {f"d{i}": MaskingKey() for i in range(n)}
    updates = {d: rng.normal(0, 0.05, SIZE).astype(np.float32) for d in keys}
    cohort = {d: k.public for d, k in keys.items()}
    masked = {d: masked_update(updates[d], d, keys[d], cohort, "f", 3, BOUND, SCALE) for d in keys}
    return keys, updates, cohort, masked


def test_pair_seeds_agree_and_depend_on_the_round():
    a, b = MaskingKey(), MaskingKey()
    assert pair_seed(a, b.public, "f", 1) == pair_seed(b, a.public, "f", 1)
    assert pair_seed(a, b.public, "f", 1) != pair_seed(a, b.public, "f", 2)
    assert MaskingKey.from_bytes(a.to_bytes()).public == a.public
    with pytest.raises(PayloadError, match="X25519"):
        pair_seed(a, b"\0" * 5, "f", 1)


def test_each_upload_alone_is_masked_and_the_sum_is_exact():
    # Execute
    _, updates, _, masked = _fleet(4)
    total = unmask_sum(masked, scale=SCALE)
    # Assert: the sum is the fixed-point sum; no single upload correlates with its update
    expected = sum(np.rint(u.astype(np.float64) * SCALE) for u in updates.values()) / SCALE
    np.testing.assert_array_equal(total, expected)
    for d, value in masked.items():
        signed = value.view(np.int32).astype(np.float64) / SCALE
        assert abs(np.corrcoef(signed, updates[d])[0, 1]) < 0.03
        assert np.abs(signed).mean() > 100  # uniform over ±2048, not the update's ±0.2


def test_one_dropout_after_masking_is_recovered_from_the_survivors():
    # Prepare: d2 masked, then dropped before its upload reached the server
    keys, updates, cohort, masked = _fleet(4)
    survivors = {d: v for d, v in masked.items() if d != "d2"}
    # Execute: each survivor reveals only its seed with d2
    revealed = [(d, "d2", pair_seed(keys[d], cohort["d2"], "f", 3)) for d in survivors]
    total = unmask_sum(survivors, revealed, SCALE)
    # Assert
    expected = sum(np.rint(updates[d].astype(np.float64) * SCALE) for d in survivors) / SCALE
    np.testing.assert_array_equal(total, expected)
    assert not np.allclose(unmask_sum(survivors, scale=SCALE), expected)  # without: garbage
    with pytest.raises(PayloadError, match="cannot reveal"):
        unmask_sum(survivors, [("d0", "d1", b"\0" * 32)], SCALE)  # d1 did not drop


def test_a_cohort_whose_sum_could_overflow_is_refused():
    key = MaskingKey()
    cohort = {f"d{i}": MaskingKey().public for i in range(2100)} | {"me": key.public}
    with pytest.raises(ConfigError, match="overflows"):
        masked_update(np.zeros(4, np.float32), "me", key, cohort, "f", 1, BOUND, SCALE)


def test_a_secure_fleet_takes_no_update_outside_a_cohort():
    from fleetune.server.secure import SecureRounds

    rounds = SecureRounds(1.0, 2.0**20)
    rounds.note_key("a", "ab" * 32)
    assert rounds.open(1, {"a"}) is None  # one device cannot hide in a sum
    for masked in (None, np.zeros(4, np.uint32)):
        with pytest.raises(PayloadError, match="no secure cohort"):
            rounds.check(1, "a", masked)
    rounds.note_key("b", "cd" * 32)
    assert rounds.open(2, {"a", "b"}) is not None
    with pytest.raises(PayloadError, match="upload masked"):
        rounds.check(2, "a", None)
    with pytest.raises(PayloadError, match="not in round 2"):
        rounds.check(2, "c", np.zeros(4, np.uint32))
    rounds.check(2, "b", np.zeros(4, np.uint32))
