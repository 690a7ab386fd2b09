"""Multi-Krum: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017. Each update is scored by the summed squared distance to its n - f - 2
nearest others and the n - f best-scored are averaged, for at most f Byzantine devices. A round
with too few updates for its f (Krum needs n > 2f + 2) uses f = (n - 3) // 2. Example counts are
ignored."""

from __future__ import annotations

import numpy as np

from fleetune.edge_sdk.errors import ConfigError
from fleetune.server.strategy.base import MAX_EXAMPLES, RobustStrategy


class Krum(RobustStrategy):
    name = "krum"

    def __init__(
        self, norm_bound: float = 0.0, max_examples: int = MAX_EXAMPLES, byzantine: int = 1
    ) -> None:
        super().__init__(norm_bound, max_examples)
        if byzantine < 0:
            raise ConfigError(f"krum: byzantine must be >= 0, got {byzantine}")
        self.byzantine = byzantine

    def tolerated(self, n: int) -> int:
        return min(self.byzantine, max(0, (n - 3) // 2))

    def scores(self, deltas: np.ndarray) -> np.ndarray:
        n, f = len(deltas), self.tolerated(len(deltas))
        sq = (deltas**2).sum(axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * deltas @ deltas.T, 0.0)
        np.fill_diagonal(dist, np.inf)
        neighbours = max(1, n - f - 2)
        return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1) if n > 1 else np.zeros(1)

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        n, f = len(deltas), self.tolerated(len(deltas))
        chosen = np.argsort(self.scores(deltas), kind="stable")[: n - f]
        return deltas[chosen].mean(axis=0)
