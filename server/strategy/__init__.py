"""Aggregation strategies, one per file over :class:`Strategy`."""

from fleetune.server.strategy.base import Aggregate, RobustStrategy, Strategy, Update
from fleetune.server.strategy.dp_fedavg import DpFedAvg
from fleetune.server.strategy.fedavg import FedAvg
from fleetune.server.strategy.krum import Krum
from fleetune.server.strategy.median import Median
from fleetune.server.strategy.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (FedAvg, Median, TrimmedMean, Krum, DpFedAvg)
}

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "DpFedAvg",
    "FedAvg",
    "Krum",
    "Median",
    "RobustStrategy",
    "Strategy",
    "TrimmedMean",
    "Update",
]
