"""Aggregation strategies, one per file over :class:`Strategy`."""

from server.strategy.base import Aggregate, Strategy, Update
from server.strategy.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "Aggregate", "FedAvg", "Strategy", "Update"]
