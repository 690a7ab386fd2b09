"""Coordinate-wise trimmed mean: Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018. Per coordinate, the ``trim`` fraction of largest and of
smallest values is dropped and the rest averaged; example counts are ignored."""

from __future__ import annotations

import math

import numpy as np

from fleetune.edge_sdk.errors import ConfigError
from fleetune.server.strategy.base import MAX_EXAMPLES, RobustStrategy


class TrimmedMean(RobustStrategy):
    name = "trimmed_mean"

    def __init__(
        self, norm_bound: float = 0.0, max_examples: int = MAX_EXAMPLES, trim: float = 0.2
    ) -> None:
        super().__init__(norm_bound, max_examples)
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trimmed mean: trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        k = math.floor(self.trim * len(deltas))
        ordered = np.sort(deltas, axis=0)
        return ordered[k : len(deltas) - k].mean(axis=0)
