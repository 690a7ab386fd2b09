"""Differential privacy: clipping, the noise scale, the accountant, DP-FedAvg, the budget."""

import math

import numpy as np
import pytest

from fleetune.edge_sdk.config import FleetuneConfig, PrivacyConfig, TuningConfig
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.privacy import clip, epsilon, gaussian, within_budget
from fleetune.server.strategy import DpFedAvg, FedAvg, Update

pytestmark = pytest.mark.unit


def test_clipping_bounds_the_whole_update_and_keeps_its_direction():
    big = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 4.0, np.float32)}  # norm 13.4
    small = {"a": np.full(4, 0.1, np.float32)}
    clipped, norm = clip(big, 2.0)
    total = math.sqrt(sum(float(np.sum(v**2)) for v in clipped.values()))
    assert norm == pytest.approx(math.sqrt(36 + 144)) and total == pytest.approx(2.0, rel=1e-6)
    assert clipped["a"][0] / clipped["b"][0] == pytest.approx(3 / 4)
    assert clip(small, 2.0)[0]["a"] == pytest.approx(small["a"])


def test_the_noise_has_the_configured_scale():
    zero = {"w": np.zeros(200_000, np.float32)}
    noisy = gaussian(zero, 1.5 * 0.2, np.random.default_rng(0))["w"]  # sigma 1.5, C 0.2
    assert abs(noisy.mean()) < 0.002
    assert noisy.std() == pytest.approx(0.3, rel=0.01)


def test_epsilon_is_the_librarys_for_the_same_releases():
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 5))
    assert epsilon(2.0, 5, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilon(2.0, 0) == 0.0 and epsilon(0.0, 1) == math.inf
    assert epsilon(2.0, 2) < epsilon(2.0, 3) < epsilon(1.0, 3)
    # a budget of 3.5 at sigma 2 allows two releases (3.19), not a third (4.01)
    assert within_budget(2.0, 1, 1e-5, 3.5) and not within_budget(2.0, 2, 1e-5, 3.5)
    assert within_budget(2.0, 10**6, 1e-5, 0.0)  # no budget


def test_dp_fedavg_clips_weighs_equally_and_adds_noise_of_sigma_c_over_n():
    # Prepare: 4 updates, one huge and claiming many examples
    current = {"w": np.zeros(100_000, np.float32)}
    updates = [
        Update(f"d{i}", 1, delta={"w": np.full(100_000, 0.001, np.float32)}) for i in range(3)
    ]
    updates.append(Update("big", 10**5, delta={"w": np.full(100_000, 1.0, np.float32)}))
    noiseless = DpFedAvg(norm_bound=1.0, noise_multiplier=0.0)
    noisy = DpFedAvg(norm_bound=1.0, noise_multiplier=2.0, rng=np.random.default_rng(0))
    # Execute
    mean = noiseless.aggregate(current, updates, lambda s: {}).tensors["w"]
    out = noisy.aggregate(current, updates, lambda s: {}).tensors["w"]
    # Assert: "big" counts as 1/4 of a unit-norm update (FedAvg would give it ~all the weight)
    per_entry = 1.0 / math.sqrt(100_000)  # its clipped value
    assert mean[0] == pytest.approx((3 * 0.001 + per_entry) / 4, rel=1e-4)
    assert FedAvg().aggregate(current, updates, lambda s: {}).tensors["w"][0] > 0.99
    assert (out - mean).std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: PrivacyConfig(noise_multiplier=1.0, clip_norm=0.0), "clip norm"),
        (lambda: PrivacyConfig(epsilon_budget=4.0), "needs noise"),
        (lambda: PrivacyConfig(delta=1.0), "delta"),
        (
            lambda: FleetuneConfig(
                tuning=TuningConfig(tuner="zo"), privacy=PrivacyConfig(noise_multiplier=1.0)
            ),
            "needs tuner",
        ),
        (lambda: DpFedAvg(norm_bound=0.0), "norm_bound"),
    ],
)
def test_privacy_settings_that_cannot_work_are_refused_by_name(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
