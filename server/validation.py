"""Checks of an update against the server's state: the wire format itself is checked by
:class:`fleetune.edge_sdk.protocol.Update`; this adds who may send what in which round."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.errors import PayloadError
from fleetune.edge_sdk.protocol import Z_VERSION, Fleet, SeedPool, Update
from fleetune.server.strategy import Update as Contribution
from fleetune.server.strategy.base import Tensors


def check_update(
    payload: bytes,
    device: str,
    fleet: Fleet,
    round_: int,
    version: int,
    pool_of: Callable[[int], SeedPool],
    seen: set[str],
    shared_a: bool = False,
    max_staleness: int = 0,
    windows: Callable[[dict[int, float], int, LoraSpec], Tensors] | None = None,
) -> Contribution:
    """Decode and validate one update from ``device`` (the topic's) for the open ``round_``,
    computed from adapter ``version`` (or, with ``max_staleness``, from up to that many versions
    before it, in an earlier round: buffered asynchronous rounds); ``PayloadError`` says why it
    is refused. ``pool_of``: a round's seed pool. ``shared_a``: the fleet keeps a
    mixture basis, whose adapters must keep LoRA A at the shared init. ``windows``: how seeds
    drawn in a window's layout replay (a round's running FedAvg sum averages each tensor over
    the devices that hold it); ``None``: updates of a window narrower than the fleet's are
    refused (every other aggregation sees whole adapters)."""
    update = Update.decode(payload, fleet)
    if update.sender != device:
        raise PayloadError(
            f"sender {update.sender!r} does not match topic device {device!r}", "identity"
        )
    if update.round > round_ or (update.round < round_ and not max_staleness):
        raise PayloadError(f"update is for round {update.round}, round {round_} is open", "round")
    if update.from_version > version or (update.from_version < version and not max_staleness):
        raise PayloadError(
            f"update was computed from adapter v{update.from_version}, "
            f"the round's adapter is v{version}",
            "round",
        )
    if version - update.from_version > max_staleness:
        raise PayloadError(
            f"update was computed from adapter v{update.from_version}, "
            f"{version - update.from_version} versions behind v{version} "
            f"(max_staleness = {max_staleness})",
            "stale",
        )
    staleness = version - update.from_version
    if device in seen:
        raise PayloadError(f"a second update from {device} in round {round_}", "duplicate")
    if update.spec is not None and windows is None:
        raise PayloadError(
            f"update tunes the top {update.spec.window} layers of the fleet's adapter; only "
            'running FedAvg sums average such windows per tensor (strategy = "fedavg" without '
            "norm_bound, clusters, basis_k or secagg)",
            "other_model",
        )
    if update.masked is not None:
        return Contribution(
            device, update.num_examples, metrics=update.metrics, masked=update.masked
        )
    if update.delta is not None:
        if shared_a and any(np.any(v) for n, v in update.delta.items() if ".lora_A." in n):
            raise PayloadError(
                "update moves LoRA A, but this fleet keeps a mixture basis (basis_k > 0) "
                'whose adapters share A: tune lora_b (backprop_params = "lora_b")',
                "other_model",
            )
        return Contribution(
            device,
            update.num_examples,
            delta=update.delta,
            metrics=update.metrics,
            round=update.round,
            staleness=staleness,
        )
    seeds, pool = update.seeds, pool_of(update.round)
    assert seeds is not None  # an Update holds a delta or seeds
    if seeds.z_version != Z_VERSION:
        raise PayloadError(
            f"seeds were drawn by z version {seeds.z_version}, this server replays {Z_VERSION}",
            "seeds",
        )
    if seeds.pool_seed != pool.pool_seed:
        raise PayloadError(
            f"seeds were drawn from pool {seeds.pool_seed}, "
            f"round {update.round} announced pool {pool.pool_seed}",
            "seeds",
        )
    if seeds.params != pool.params:
        raise PayloadError(f"seeds move {seeds.params!r}, the fleet tunes {pool.params!r}", "seeds")
    try:
        seeds.check(pool.pool_size)
    except PayloadError as err:
        raise PayloadError(str(err), "seeds") from err
    if update.spec is not None:  # drawn in the window's layout: summed as its dense delta
        assert windows is not None  # refused above
        return Contribution(
            device,
            update.num_examples,
            delta=windows(seeds.merged(), update.round, update.spec),
            metrics=update.metrics,
            round=update.round,
            staleness=staleness,
        )
    return Contribution(
        device,
        update.num_examples,
        seeds=seeds.merged(),
        metrics=update.metrics,
        round=update.round,
        staleness=staleness,
    )
