"""Clustered personalization (IFCA, Ghosh et al., NeurIPS 2020): the server keeps K cluster
adapters for the life of the fleet and pushes every device its cluster's, on its retained
``adapter/device/{id}``. The first round with updates groups them by direction (k-means over
unit-norm deltas); from then on each round's devices join a cluster by one of two rules
(``[server] cluster_assign``):

- ``direction``: the cluster whose last change points most the device's way (a device keeps its
  cluster while it pulls the same way); nothing more goes down or up.
- ``loss`` (IFCA's own rule): the server also publishes every cluster adapter on its retained
  ``adapter/cluster/{c}``; each device's canary scores them all on its validation text and the
  update reports the losses (``cluster_losses``), and the device joins the cluster that fits
  it best. It costs K adapters downlink and K validation passes a round on each device. A
  device that reports no usable losses (local DP strips them, a secure round has no metrics)
  is assigned by direction.

Each cluster adapter then moves by ``step`` times its members' aggregate change (``[server]
cluster_step``: members of a cluster pull the same way, so a step above 1 goes further). A
device that starts its rounds from its cluster adapter (``[tuning] start = "cluster"``) tunes
that adapter further, as IFCA does; its canary (``edge_sdk/canary.py``) serves a cluster
adapter only where it beats the global and the device's own tuning on its validation text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import AggregationError, PayloadError
from fleetune.edge_sdk.protocol import Fleet, PersonalAdapter
from fleetune.server.basis import kmeans, span
from fleetune.server.strategy import Strategy, Update
from fleetune.server.strategy.base import Tensors

log = logging.getLogger(__name__)
# k-means++ starts for the first grouping, the least-inertia one kept: on 24 devices' round-1
# deltas (benchmarks/personalization.py --bystanders, seeds 0-2) 10 starts kept groupings with
# 1.6-2% more inertia than the best (from seed 0: all fortunes in one cluster, two of one device);
# 300 found the best from each of 6 k-means seeds on each fleet, in ~0.1 s on the devices' span
# coordinates + 0.7 s for the QR (10 starts over the 460,800 raw numbers took 2.4 s)
KMEANS_RESTARTS = 300


def cluster_adapters(
    before: Tensors,
    updates: list[Update],
    k: int,
    strategy: Strategy,
    replay: Callable[[dict[int, float]], Tensors],
    layout: FlatLayout,
    seed: int = 0,
) -> dict[str, tuple[int, Tensors]]:
    """Each device's (cluster, adapter): ``before`` plus the aggregate of its cluster's updates.
    A cluster the strategy cannot aggregate (say, Krum with too few members) is left out: its
    devices keep the global adapter."""
    if k < 2 or len(updates) < 2:
        return {}
    updates = sorted(updates, key=lambda u: u.device)  # the groups do not hang on arrival order
    flats = np.stack([layout.flatten(u.delta or replay(u.seeds or {})) for u in updates])
    norms = np.linalg.norm(flats, axis=1, keepdims=True)
    unit = span(flats / np.maximum(norms, 1e-12))
    _, labels = kmeans(unit, k, seed=seed, restarts=KMEANS_RESTARTS)
    out: dict[str, tuple[int, Tensors]] = {}
    for cluster in sorted(set(labels.tolist())):
        members = [u for u, label in zip(updates, labels, strict=True) if label == cluster]
        try:
            merged = strategy.aggregate(before, members, replay)
        except AggregationError as err:
            log.info("cluster %d (%d devices): no adapter (%s)", cluster, len(members), err)
            continue
        for member in members:
            out[member.device] = (int(cluster), merged.tensors)
    return out


class Clusters:
    """The fleet's persistent cluster adapters and who belongs to which."""

    def __init__(
        self,
        k: int,
        step: float,
        strategy: Strategy,
        layout: FlatLayout,
        saved: Tensors | None = None,
    ) -> None:
        """``saved``: what :meth:`state` returned before a restart."""
        self.k, self.step, self.strategy, self.layout = k, step, strategy, layout
        self.models: dict[int, Tensors] = {}
        self.heading: dict[int, np.ndarray] = {}  # unit direction of each cluster's last change
        self.of: dict[str, int] = {}
        for key, value in (saved or {}).items():
            if key == "members":
                self.of = json.loads(bytes(value).decode())
            elif key.startswith("heading/"):
                self.heading[int(key.split("/")[1])] = value
            else:
                c, name = key.split("/", 1)
                self.models.setdefault(int(c), {})[name] = value

    def state(self) -> Tensors:
        """Everything a restarted server needs, as named arrays."""
        out = {f"{c}/{n}": v for c, model in self.models.items() for n, v in model.items()}
        out |= {f"heading/{c}": v for c, v in self.heading.items()}
        out["members"] = np.frombuffer(json.dumps(self.of).encode(), np.uint8)
        return out

    def advance(
        self,
        before: Tensors,
        updates: list[Update],
        replay: Callable[[dict[int, float]], Tensors],
        seed: int = 0,
        assign: dict[str, int] | None = None,
    ) -> dict[str, tuple[int, Tensors]]:
        """Fold the round's updates into the cluster adapters (the first round forms them from
        ``before``, the round's global); returns each updating device's (cluster, adapter).
        After the first round a device joins the cluster ``assign`` names (a caller that knows,
        say by validation loss: :meth:`picks_by_loss`) or else the one its change points most
        toward."""
        if not self.models:
            grouped = cluster_adapters(
                before, updates, self.k, self.strategy, replay, self.layout, seed
            )
            for device, (c, merged) in grouped.items():
                self.of[device] = c
                if c not in self.models:
                    self.models[c] = before
                    self._move(c, merged)
        else:
            assign = {d: c for d, c in (assign or {}).items() if c in self.models}
            self._assign([u for u in updates if u.device not in assign], replay)
            self.of.update({u.device: assign[u.device] for u in updates if u.device in assign})
            for c in sorted({self.of[u.device] for u in updates if u.device in self.of}):
                members = [u for u in updates if self.of.get(u.device) == c]
                try:
                    self._move(c, self.strategy.aggregate(self.models[c], members, replay).tensors)
                except AggregationError as err:
                    log.info("cluster %d (%d devices): not moved (%s)", c, len(members), err)
        return {
            u.device: (self.of[u.device], self.models[self.of[u.device]])
            for u in updates
            if u.device in self.of
        }

    def _move(self, c: int, merged: Tensors) -> None:
        """Cluster ``c`` from where it is by ``step`` x (``merged`` - where it is)."""
        model = self.models[c]
        change = {n: merged[n] - model[n] for n in model}
        self.models[c] = {n: model[n] + self.step * change[n] for n in model}
        flat = self.layout.flatten(change)
        self.heading[c] = flat / max(float(np.linalg.norm(flat)), 1e-12)

    def picks_by_loss(self, updates: list[Update]) -> dict[str, int]:
        """Each device's cluster by the validation losses its update reports
        (``metrics["cluster_losses"]``, {cluster: loss} over every cluster adapter it scored),
        the lowest wins; a device whose report is missing, malformed or leaves out a cluster
        is not in the answer (it is assigned by direction)."""
        picks = {}
        for u in updates:
            reported = u.metrics.get("cluster_losses")
            if reported is None:
                continue
            try:
                losses = {int(c): float(v) for c, v in reported.items()}
            except (AttributeError, TypeError, ValueError) as err:
                log.warning("%s: cluster_losses is not {cluster: loss}: %s", u.device, err)
                continue
            if set(losses) != set(self.models) or not all(map(np.isfinite, losses.values())):
                log.info(
                    "%s: losses for clusters %s, not for all of %s: assigned by direction",
                    u.device,
                    sorted(losses),
                    sorted(self.models),
                )
                continue
            picks[u.device] = min(losses, key=losses.__getitem__)
        return picks

    def _assign(self, updates: list[Update], replay) -> None:
        """Each device joins the cluster whose last change points most its way (a device new
        to the fleet, or one the first round's k-means put with the wrong group)."""
        for u in updates:
            flat = self.layout.flatten(u.delta or replay(u.seeds or {}))
            c = max(self.heading, key=lambda c: float(self.heading[c] @ flat))
            if self.of.get(u.device) != c:
                log.info("%s: cluster %s -> %d", u.device, self.of.get(u.device), c)
            self.of[u.device] = c


def encode_personal(
    models: dict[int, Tensors], fleet: Fleet, encoding: str, version: int
) -> dict[int, bytes]:
    """Each cluster's adapter as its message (``adapter/cluster/{c}``, and the
    ``adapter/device/{id}`` of each of its devices); one the downlink encoding cannot carry
    (beyond f16's range) is left out, and its devices keep the global."""
    out = {}
    for c, tensors in sorted(models.items()):
        try:
            out[c] = PersonalAdapter(tensors, cluster=c, version=version).encode(fleet, encoding)
        except PayloadError as err:
            log.warning("no adapter for cluster %d: %s", c, err)
    return out
