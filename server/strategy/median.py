"""Coordinate-wise median: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. Each coordinate of the round's delta is the median of the
updates' coordinates; example counts are ignored (a count is the device's own claim)."""

from __future__ import annotations

import numpy as np

from fleetune.server.strategy.base import RobustStrategy


class Median(RobustStrategy):
    name = "median"

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)
