"""Buffered asynchronous rounds (FedBuff: Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022). With ``[server] mode = "async"`` the server folds the
buffer into the global every ``quorum`` updates (or at the round's timeout, whatever arrived)
and never waits for a slow device: an update computed from an older version is still taken, up
to ``max_staleness`` versions behind, its change scaled by ``(1 + staleness) ** -exponent``
(the paper's polynomial discount; 0.5 by default), so the fold is
``global += sum_i w_i s_i delta_i / sum_i w_i`` with ``w_i`` the example counts. Beyond
``max_staleness`` an update is refused (reason ``stale``): its device has since received newer
versions and its next update will be fresher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from fleetune.server.strategy.base import Seeds, Tensors, Update


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial discount of an update ``staleness`` versions behind."""
    return float((1.0 + staleness) ** -exponent)


def discount(
    update: Update, round_: int, exponent: float, replay: Callable[[Seeds, int], Tensors]
) -> Update:
    """``update`` as it enters round ``round_``'s fold: scaled by its staleness weight; seeds
    drawn in an earlier round are replayed with that round's pool (a dense delta then)."""
    weight = staleness_weight(update.staleness, exponent)
    if update.seeds is not None and update.round not in (0, round_):
        delta = replay(update.seeds, update.round)
        return replace(update, seeds=None, delta={k: weight * v for k, v in delta.items()})
    if weight == 1.0:
        return update
    if update.seeds is not None:
        return replace(update, seeds={i: weight * c for i, c in update.seeds.items()})
    if update.delta is not None:
        return replace(update, delta={k: weight * v for k, v in update.delta.items()})
    return update
