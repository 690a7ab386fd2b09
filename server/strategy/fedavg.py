"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The new global is the current one plus the example-weighted mean delta."""

from __future__ import annotations

from edge_sdk.errors import AggregationError
from server.strategy.base import Strategy, Tensors, Update


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, current: Tensors, updates: list[Update]) -> Tensors:
        if not updates:
            raise AggregationError("FedAvg needs at least one update")
        weights = [max(u.num_examples, 0) for u in updates]
        total = float(sum(weights))
        if total <= 0:
            weights, total = [1] * len(updates), float(len(updates))
        out = {}
        for name, value in current.items():
            weighted = (w * u.delta[name] for w, u in zip(weights, updates, strict=True))
            mean_delta = sum(weighted) / total
            out[name] = (value + mean_delta).astype(value.dtype)
        return out
