"""Client-level differential privacy: clip a device's whole update to L2 norm ``clip`` and add
Gaussian noise of standard deviation ``noise_multiplier * clip`` (DP-FedAvg, McMahan et al.,
"Learning Differentially Private Recurrent Language Models", ICLR 2018).

- Local DP (``[privacy]`` on the device): the device clips and noises its own update before it
  leaves; each upload is one Gaussian mechanism on that device's data.
- Central DP (``[server] dp_*``): the server clips every update, averages them with equal
  weights and adds the noise once to the sum; each round is one Gaussian mechanism for every
  device in it.

Either way a device's epsilon after k contributions comes from Google's ``dp-accounting`` RDP
accountant (k self-composed Gaussian mechanisms of the same noise multiplier, neighbouring
fleets differing by one device's presence); no subsampling amplification is claimed, since
devices choose when they take part. A budget stops further contributions once spent.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np

from fleetune.edge_sdk.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]


def clip(delta: Tensors, bound: float) -> tuple[Tensors, float]:
    """``delta`` scaled to L2 norm at most ``bound`` (all tensors together), and its norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(np.float32) for k, v in delta.items()}, norm


def gaussian(delta: Tensors, std: float, rng: np.random.Generator) -> Tensors:
    """``delta`` plus independent N(0, std^2) on every entry."""
    return {
        k: (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in delta.items()
    }


@lru_cache(maxsize=1024)
def epsilon(noise_multiplier: float, releases: int, delta: float = 1e-5) -> float:
    """The epsilon of ``releases`` Gaussian mechanisms of ``noise_multiplier`` at ``delta``
    (``inf`` without noise; 0 with no release)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as err:
        raise BackendUnavailable(
            "privacy accounting needs dp-accounting: pip install 'fleetune[dp]'"
        ) from err
    accountant = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
    return float(accountant.get_epsilon(delta))


def check(clip_norm: float, noise_multiplier: float, delta: float, budget: float, where: str):
    """The shared checks of a ``[privacy]`` or ``[server] dp_*`` configuration."""
    if noise_multiplier < 0 or (noise_multiplier > 0 and clip_norm <= 0):
        raise ConfigError(f"{where}: noise needs a clip norm > 0 and a noise multiplier >= 0")
    if not 0 < delta < 1:
        raise ConfigError(f"{where}: delta must be in (0, 1), got {delta}")
    if budget < 0 or (budget > 0 and noise_multiplier == 0):
        raise ConfigError(f"{where}: an epsilon budget needs noise (noise_multiplier > 0)")


def within_budget(noise_multiplier: float, done: int, delta: float, budget: float) -> bool:
    """Whether one more contribution keeps epsilon within ``budget`` (0 = no budget)."""
    return budget <= 0 or epsilon(noise_multiplier, done + 1, delta) <= budget
