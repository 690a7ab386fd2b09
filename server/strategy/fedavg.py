"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The new global is the current one plus the example-weighted mean delta.

Zeroth-order updates arrive as seeds (FedKSeed, Qin et al., ICML 2024): their weighted mean is a
weighted sum of coefficients per seed, replayed once, so the cost does not grow with the fleet.
With a norm bound the updates are replayed one by one and clipped first (dense downlink).
A window device's update holds only the top layers of the fleet's adapter: the running sum
(``fold``) averages each tensor over the updates that hold it, so a layer only full-depth
devices tune moves by their mean, not by half of it.
"""

from __future__ import annotations

import math

import numpy as np

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import AggregationError
from fleetune.server.strategy.base import (
    Aggregate,
    Replay,
    RobustStrategy,
    Seeds,
    Tensors,
    Update,
)

# What an update that claims no examples weighs in a running sum: nothing next to any that claims
# some, and all-zero rounds average equally (FedAvg's rule when every count is zero)
ZERO_WEIGHT = 1e-9


def running_weight(num_examples: int, max_examples: int) -> float:
    """An update's FedAvg weight in a running sum: its example count, capped."""
    return float(min(max(num_examples, 0), max_examples)) or ZERO_WEIGHT


def fold(
    current: Tensors,
    layout: FlatLayout,
    total: np.ndarray,
    weight: float,
    seeds: Seeds,
    replay: Replay,
    cover: np.ndarray | None = None,
) -> Aggregate | None:
    """FedAvg from running sums: ``total`` = sum of weight x flat delta (float64), ``seeds`` =
    sum of weight x coefficient per seed index; the seeds' mean replayed once. ``cover``: the
    weight summed per layout entry when some updates held only some entries (window devices):
    each tensor is then the mean over the updates that hold it, and a tensor none holds stays.
    ``None`` when nothing was summed."""
    if weight <= 0:
        return None
    if cover is not None and np.any(cover != weight):
        return _fold_per_tensor(current, layout, total, cover, seeds, replay)
    flat = layout.flatten(current).astype(np.float64) + total / weight
    tensors = layout.unflatten(flat.astype(np.float32))
    mean = {index: coef / weight for index, coef in seeds.items()}
    if mean:
        for name, value in replay(mean).items():
            tensors[name] = tensors[name] + value
    only_seeds = not np.any(total)
    return Aggregate(tensors, mean if mean and only_seeds else None)


def _fold_per_tensor(
    current: Tensors,
    layout: FlatLayout,
    total: np.ndarray,
    cover: np.ndarray,
    seeds: Seeds,
    replay: Replay,
) -> Aggregate:
    """``fold`` where entries were summed over different updates: the seeds' sums replay as a
    dense delta (replay is linear) and every entry divides by its own weight (dense downlink)."""
    if cover.shape != (len(layout.entries),) or not np.all(np.isfinite(cover) & (cover >= 0)):
        raise AggregationError(
            f"a running sum's weights per tensor are {cover.shape}, not "
            f"{len(layout.entries)} non-negative numbers"
        )
    summed = total + layout.flatten(replay(seeds)).astype(np.float64) if seeds else total
    per = np.repeat(cover, [math.prod(shape) for _, shape, _ in layout.entries])
    step = np.divide(summed, per, out=np.zeros_like(summed), where=per > 0)
    flat = layout.flatten(current).astype(np.float64) + step
    return Aggregate(layout.unflatten(flat.astype(np.float32)))


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
                for name, value in out.items():  # in the adapter's dtype, without temporaries
                    value += value.dtype.type(share) * update.delta[name]
            for index, coef in (update.seeds or {}).items():
                seeds[index] = seeds.get(index, 0.0) + share * coef
        if seeds:
            for name, value in replay(seeds).items():
                out[name] += value
        only_seeds = all(u.delta is None for u in updates)
        return Aggregate(out, seeds if only_seeds else None)
