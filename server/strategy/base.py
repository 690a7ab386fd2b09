"""The strategy interface: turn the current global adapter and a round's updates into the next.

Shared rules every strategy follows: an update's example count counts at most ``max_examples``
(a device claiming 2**62 examples must not dictate the global), and with ``norm_bound > 0`` each
update's delta is clipped to that L2 norm first (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019), which combines with any strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fleetune.edge_sdk.errors import AggregationError

Tensors = dict[str, np.ndarray]
Seeds = dict[int, float]  # seed index -> summed coefficient (a zeroth-order run)
Replay = Callable[[Seeds], Tensors]  # seeds -> the dense delta they stand for
MAX_EXAMPLES = 100_000  # training windows one update may weigh as, at most


@dataclass(frozen=True)
class Update:
    """One accepted device update against the round's global adapter: a dense ``delta``, or
    the ``seeds`` of a zeroth-order run (each seed index with its summed coefficient). In
    buffered asynchronous rounds it may be ``staleness`` versions behind, from an earlier
    ``round`` (whose seed pool replays its seeds)."""

    device: str
    num_examples: int
    delta: Tensors | None = None
    seeds: Seeds | None = None
    metrics: dict = field(default_factory=dict)
    masked: np.ndarray | None = None  # secure aggregation: opened only in sum (server/secure.py)
    round: int = 0
    staleness: int = 0


@dataclass(frozen=True)
class Aggregate:
    tensors: Tensors  # the next global adapter
    seeds: Seeds | None = None  # when every update was seeds: the merged seeds (tiny downlink)


class Strategy(ABC):
    """One aggregation algorithm per file; subclasses cite their paper."""

    name: str = "base"

    def __init__(self, norm_bound: float = 0.0, max_examples: int = MAX_EXAMPLES) -> None:
        self.norm_bound, self.max_examples = norm_bound, max_examples

    @abstractmethod
    def aggregate(self, current: Tensors, updates: list[Update], replay: Replay) -> Aggregate:
        """Return the next global adapter. ``updates`` is non-empty and validated; ``replay``
        turns merged seeds into a dense delta (each seed drawn once, whatever the fleet size)."""

    def weights(self, updates: list[Update]) -> np.ndarray:
        """Example counts, capped at ``max_examples``; equal weights if none has any."""
        counts = np.array([min(max(u.num_examples, 0), self.max_examples) for u in updates], float)
        return counts if counts.sum() > 0 else np.ones(len(updates))

    def deltas(self, current: Tensors, updates: list[Update], replay: Replay) -> np.ndarray:
        """Every update as one flat delta [n, d] (seeds replayed per device), each clipped to
        ``norm_bound`` when set."""
        if not updates:
            raise AggregationError(f"{self.name} needs at least one update")
        rows = []
        for update in updates:
            delta = update.delta if update.delta is not None else replay(update.seeds or {})
            rows.append(np.concatenate([delta[name].reshape(-1) for name in sorted(current)]))
        flat = np.stack(rows).astype(np.float64)
        if self.norm_bound > 0:
            norms = np.linalg.norm(flat, axis=1, keepdims=True)
            flat *= np.minimum(1.0, self.norm_bound / np.maximum(norms, 1e-30))
        return flat

    @staticmethod
    def apply(current: Tensors, flat: np.ndarray) -> Tensors:
        """``current`` plus a flat delta in :meth:`deltas`' order."""
        out, offset = {}, 0
        for name in sorted(current):
            value = current[name]
            out[name] = value + flat[offset : offset + value.size].reshape(value.shape).astype(
                value.dtype
            )
            offset += value.size
        return out


class RobustStrategy(Strategy):
    """A strategy that combines the (clipped) dense deltas coordinate- or update-wise."""

    @abstractmethod
    def combine(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The round's delta from the updates' deltas [n, d]."""

    def aggregate(self, current: Tensors, updates: list[Update], replay: Replay) -> Aggregate:
        deltas = self.deltas(current, updates, replay)
        return Aggregate(self.apply(current, self.combine(deltas, self.weights(updates))))
