"""The on-device canary: before a device serves an adapter, it scores it on validation windows of
its own text (split off the training text, never trained on, distinct from the held-out text that
reports use). It serves the candidate with the lowest validation loss, but only one that beats
what it serves now; it starts from the base model, so it never serves anything worse than the
base on its validation text. The previous adapter is kept for :meth:`Canary.rollback`.

Candidates (``edge_sdk/rounds.py``): ``global`` (the fleet's adapter), ``local`` (this round's
tuning, which starts from what is served: the device's own line), ``cluster`` (the server's
adapter for the devices whose updates resemble this one's), ``blend`` (the device's last tuning
moved part of the way toward the fleet's adapter that fits it best: :func:`blend`), ``kept``
(what was served before a restart, from disk), and whatever is served already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetune.edge_sdk.tuners.base import Tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    name: str  # base | global | local | cluster | ...
    version: int  # the global version it came with
    loss: float  # validation loss
    tensors: Tensors = field(repr=False)


@dataclass(frozen=True)
class Choice:
    """What one offer decided: the adapter served after it, and every candidate's loss."""

    served: str
    version: int
    switched: bool
    losses: dict[str, float]

    def metrics(self) -> dict[str, object]:
        """For the update's metrics header (the server logs what devices serve)."""
        return {
            "served": self.served,
            "val_losses": {k: round(v, 4) for k, v in self.losses.items()},
        }


class Canary:
    def __init__(
        self,
        score: Callable[[Tensors], float],
        base: Tensors,
        who: str = "",
        keep: Callable[[Served], None] | None = None,
        share: float = 0.0,
    ) -> None:
        """``score(tensors)`` is the validation loss of an adapter (lower is better); ``who``
        names the device in the log; ``keep(served)`` saves each newly served adapter;
        ``share``: how far a :func:`blend` moves the device's tuning (``[tuning] blend``)."""
        self.score, self.who, self.keep, self.share = score, who, keep, share
        self.served = Served("base", 0, score(base), base)
        self.previous: Served | None = None

    def offer(
        self, candidates: dict[str, Tensors], version: int, own: Tensors | None = None
    ) -> Choice:
        """Score ``candidates`` and serve the best if it beats the served adapter; with ``own``,
        the device's last tuning, the fleet's adapters among them also bring their ``blend``."""
        losses = {name: self.score(tensors) for name, tensors in candidates.items()}
        mixed = blend(own, candidates, losses, self.share)
        if mixed is not None:
            candidates = candidates | {"blend": mixed}
            losses["blend"] = self.score(mixed)
        losses[f"served:{self.served.name}"] = self.served.loss
        best = min(candidates, key=losses.__getitem__, default=None)
        switched = best is not None and losses[best] < self.served.loss
        if switched and best is not None:
            self.previous = self.served
            self.served = Served(best, version, losses[best], candidates[best])
            log.info(
                "%s canary: serving %s v%d (validation loss %.4f)",
                self.who,
                best,
                version,
                losses[best],
            )
            if self.keep is not None:
                self.keep(self.served)
        return Choice(self.served.name, self.served.version, switched, losses)

    def rollback(self) -> Served:
        """Serve the previous adapter again (the application found the current one wanting)."""
        if self.previous is None:
            return self.served
        self.served, self.previous = self.previous, None
        if self.keep is not None:
            self.keep(self.served)
        log.info(
            "%s canary: rolled back to %s v%d", self.who, self.served.name, self.served.version
        )
        return self.served


def blend(
    own: Tensors | None, offered: dict[str, Tensors], losses: dict[str, float], share: float
) -> Tensors | None:
    """The candidate ``blend``: the device's last tuning ``own`` moved ``share`` of the way
    toward the fleet's adapter among ``offered`` with the lowest validation loss (its best
    ``cluster…`` adapter, else the ``global``); ``None`` before the device has tuned, with
    ``share = 0``, or where the two do not hold the same tensors (a window device's tuning)."""
    fleet = [name for name in offered if name.startswith("cluster")] or ["global"]
    if not share or own is None or fleet[0] not in offered:
        return None
    toward = offered[min(fleet, key=losses.__getitem__)]
    if toward.keys() != own.keys():
        return None
    return {k: v + share * (toward[k] - v) for k, v in own.items()}
