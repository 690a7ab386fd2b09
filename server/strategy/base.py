"""The strategy interface: turn the current global adapter and a round's updates into the next."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]
Seeds = dict[int, float]  # seed index -> summed coefficient (a zeroth-order run)
Replay = Callable[[Seeds], Tensors]  # seeds -> the dense delta they stand for


@dataclass(frozen=True)
class Update:
    """One accepted device update against the round's global adapter: a dense ``delta``, or
    the ``seeds`` of a zeroth-order run (each seed index with its summed coefficient)."""

    device: str
    num_examples: int
    delta: Tensors | None = None
    seeds: Seeds | None = None
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregate:
    tensors: Tensors  # the next global adapter
    seeds: Seeds | None = None  # when every update was seeds: the merged seeds (tiny downlink)


class Strategy(ABC):
    """One aggregation algorithm per file; subclasses cite their paper."""

    name: str = "base"

    @abstractmethod
    def aggregate(self, current: Tensors, updates: list[Update], replay: Replay) -> Aggregate:
        """Return the next global adapter. ``updates`` is non-empty and validated; ``replay``
        turns merged seeds into a dense delta (each seed drawn once, whatever the fleet size)."""
