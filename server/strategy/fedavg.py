"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The new global is the current one plus the example-weighted mean delta.

Zeroth-order updates arrive as seeds (FedKSeed, Qin et al., ICML 2024): their weighted mean is a
weighted sum of coefficients per seed, replayed once, so the cost does not grow with the fleet.
With a norm bound the updates are replayed one by one and clipped first (dense downlink).
"""

from __future__ import annotations

import numpy as np

from fleetune.edge_sdk.errors import AggregationError
from fleetune.server.strategy.base import (
    Aggregate,
    Replay,
    RobustStrategy,
    Seeds,
    Tensors,
    Update,
)


class FedAvg(RobustStrategy):
    name = "fedavg"

    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return weights @ deltas / weights.sum()

    def aggregate(self, current: Tensors, updates: list[Update], replay: Replay) -> Aggregate:
        if not updates:
            raise AggregationError("FedAvg needs at least one update")
        if self.norm_bound > 0:
            return super().aggregate(current, updates, replay)
        weights = self.weights(updates)
        total = float(weights.sum())
        out = {name: value.copy() for name, value in current.items()}
        seeds: Seeds = {}
        for weight, update in zip(weights, updates, strict=True):
            share = float(weight) / total
            if update.delta is not None:
                for name in out:
                    out[name] += (share * update.delta[name]).astype(out[name].dtype)
            for index, coef in (update.seeds or {}).items():
                seeds[index] = seeds.get(index, 0.0) + share * coef
        if seeds:
            for name, value in replay(seeds).items():
                out[name] += value
        only_seeds = all(u.delta is None for u in updates)
        return Aggregate(out, seeds if only_seeds else None)
