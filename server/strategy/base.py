"""The strategy interface: turn the current global adapter and a round's updates into the next."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One accepted device update: a delta against the round's global adapter."""

    device: str
    num_examples: int
    delta: Tensors
    metrics: dict = field(default_factory=dict)


class Strategy(ABC):
    """One aggregation algorithm per file; subclasses cite their paper."""

    name: str = "base"

    @abstractmethod
    def aggregate(self, current: Tensors, updates: list[Update]) -> Tensors:
        """Return the next global adapter. ``updates`` is non-empty and validated."""
