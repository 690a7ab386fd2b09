"""DP-FedAvg: McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018. Each update is clipped to L2 norm C (``norm_bound``), the clipped updates are summed with
equal weights (an example count would let a device claim more influence than the noise
covers), Gaussian noise of standard deviation sigma * C is added to the sum once, and the result
is divided by the number of updates: central differential privacy at the server. The epsilon it
spends is accounted in ``edge_sdk/privacy.py``; seeds are replayed to dense deltas first.
"""

from __future__ import annotations

import numpy as np

from fleetune.edge_sdk.errors import ConfigError
from fleetune.server.strategy.base import MAX_EXAMPLES, RobustStrategy


class DpFedAvg(RobustStrategy):
    name = "dp_fedavg"

    def __init__(
        self,
        norm_bound: float = 0.0,
        max_examples: int = MAX_EXAMPLES,
        noise_multiplier: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if norm_bound <= 0 or noise_multiplier < 0:
            raise ConfigError(
                "dp_fedavg clips every update: norm_bound (the clip norm C) must be > 0 and "
                "dp_noise_multiplier >= 0"
            )
        super().__init__(norm_bound, max_examples)
        self.noise_multiplier = noise_multiplier
        self.rng = rng if rng is not None else np.random.default_rng()

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        std = self.noise_multiplier * self.norm_bound
        noisy_sum = deltas.sum(axis=0) + self.rng.normal(0.0, std, size=deltas.shape[1])
        return noisy_sum / len(deltas)
