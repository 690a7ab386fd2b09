import numpy as np
import pytest

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.tuners.zo import ZOConfig, perturbation, replay, zo_tune

pytestmark = pytest.mark.unit


def test_perturbations_are_reproducible_and_distinct():
    a = perturbation(5, 3, 1000)
    assert a.dtype == np.float32 and np.array_equal(a, perturbation(5, 3, 1000))
    assert not np.array_equal(a, perturbation(5, 4, 1000))
    assert not np.array_equal(a, perturbation(6, 3, 1000))
    assert abs(float(a.std()) - 1.0) < 0.1


def test_directions_are_rotations_of_one_vector_and_replay_is_their_weighted_sum():
    # Prepare: 300 pairs over 200 seeds (some repeated) of a 5,000-entry vector
    rng = np.random.default_rng(0)
    seeds, coefs = rng.integers(0, 200, 300), rng.normal(size=300)
    pairs = [(int(s), float(c)) for s, c in zip(seeds, coefs, strict=True)]
    z = {s: perturbation(9, s, 5000) for s, _ in pairs}
    # Execute
    delta = replay(pairs, 9, 5000)
    # Assert: the FFT replay is the direct sum; directions are rotations, nearly orthogonal
    direct = np.zeros(5000)
    for s, c in pairs:
        direct += c * z[s].astype(np.float64)
    np.testing.assert_allclose(delta, direct, rtol=0, atol=1e-4)
    assert np.array_equal(np.roll(z[pairs[0][0]], 7919 * pairs[0][0]), perturbation(9, 0, 5000))
    a, b = perturbation(9, 1, 5000), perturbation(9, 2, 5000)
    assert abs(float(a @ b)) / 5000 < 0.06  # |cos| of independent draws: ~1/sqrt(5000)
    assert replay([], 9, 5000).sum() == 0


def test_zo_lowers_a_quadratic_and_replay_rebuilds_the_run():
    # Prepare: loss = |theta[tuned] - target|^2, only half of theta is tuned
    rng = np.random.default_rng(0)
    theta = np.zeros(64, dtype=np.float32)
    tuned = np.arange(0, 64, 2)
    target = rng.normal(size=tuned.size).astype(np.float32)

    def loss(th, step):
        return float(((th[tuned] - target) ** 2).sum())

    start = loss(theta, 0)
    # Execute
    pairs, metrics = zo_tune(
        loss, theta, tuned, 300, ZOConfig(lr=5e-3, eps=1e-3, pool_size=64), np.random.default_rng(1)
    )
    # Assert
    assert loss(theta, 0) < 0.2 * start
    assert np.all(theta[1::2] == 0)  # untouched entries stay put
    assert metrics["forward_passes"] == 600
    np.testing.assert_allclose(replay(pairs, 0, tuned.size), theta[tuned], atol=1e-5)


def test_several_perturbations_and_schedules():
    cfg = ZOConfig(perturbations=3, schedule="cosine", lr=0.1, eps_schedule="linear", eps=1e-2)
    assert cfg.lr_at(0, 10) == pytest.approx(0.1) and cfg.lr_at(10, 10) == pytest.approx(0.0)
    assert cfg.eps_at(0, 10) == pytest.approx(1e-2) and cfg.eps_at(10, 10) == pytest.approx(1e-3)
    pairs, _ = zo_tune(
        lambda th, s: float((th**2).sum()),
        np.ones(4, np.float32),
        np.arange(4),
        5,
        cfg,
        np.random.default_rng(0),
    )
    assert len(pairs) == 15


@pytest.mark.parametrize(
    "kw", [{"lr": 0}, {"eps": 2}, {"perturbations": 0}, {"schedule": "x"}, {"eps_schedule": "y"}]
)
def test_bad_zo_config_is_refused(kw):
    with pytest.raises(ConfigError):
        ZOConfig(**kw)


def test_a_slice_of_theta_is_perturbed_both_ways():
    # a slice is a view of theta: the minus point must still be theta - eps*z
    seen = []
    theta = np.zeros(3, np.float32)
    zo_tune(
        lambda th, s: seen.append(th.copy()) or 0.0,
        theta,
        slice(None),
        1,
        ZOConfig(eps=0.1),
        np.random.default_rng(0),
    )
    np.testing.assert_allclose(seen[0], -seen[1], atol=1e-7)
    assert np.abs(seen[0]).max() > 0
