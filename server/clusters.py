"""Clustered personalization: after each round, the server groups the round's updates by
direction (k-means over unit-norm deltas, as IFCA groups clients by which model fits them) and
pushes every device the aggregate of its own group, on its retained ``adapter/device/{id}``.
The device's canary (``edge_sdk/canary.py``) serves it only where it beats the global adapter
and the device's own tuning on its validation text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import AggregationError, PayloadError
from fleetune.edge_sdk.protocol import Fleet, PersonalAdapter
from fleetune.server.basis import kmeans
from fleetune.server.strategy import Strategy, Update
from fleetune.server.strategy.base import Tensors

log = logging.getLogger(__name__)


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
    flats = np.stack([layout.flatten(u.delta or replay(u.seeds or {})) for u in updates])
    norms = np.linalg.norm(flats, axis=1, keepdims=True)
    _, labels = kmeans(flats / np.maximum(norms, 1e-12), k, seed=seed)
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


def encode_personal(
    personal: dict[str, tuple[int, Tensors]], fleet: Fleet, encoding: str, version: int
) -> dict[str, bytes]:
    """Each device's cluster adapter as its ``adapter/device/{id}`` message; one the downlink
    encoding cannot carry (beyond f16's range) is left out, and that device keeps the global."""
    out = {}
    for device, (cluster, tensors) in sorted(personal.items()):
        try:
            out[device] = PersonalAdapter(tensors, cluster=cluster, version=version).encode(
                fleet, encoding
            )
        except PayloadError as err:
            log.warning("no cluster adapter for %s: %s", device, err)
    return out
