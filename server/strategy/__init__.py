"""Aggregation strategies, one per file over :class:`Strategy`."""

from fleetune.server.strategy.base import Aggregate, Strategy, Update
from fleetune.server.strategy.fedavg import FedAvg

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "Aggregate", "FedAvg", "Strategy", "Update"]
