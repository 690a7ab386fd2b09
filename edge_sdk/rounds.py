"""The device's round loop: follow the server's retained announcements, tune, and upload the
change through the outbox.

Each round starts from the adapter the device serves (``[tuning] start = "served"``, the
default): its own line of tuning, or the global or cluster adapter where its canary found that
better. The upload is the change the round made, which the server adds to the global (FedAvg of
changes); with every device on its own line the global is the mean of their adapters. With
``start = "global"`` every round starts from the round's global adapter (plain FedAvg); with
``start = "cluster"`` from the latest cluster adapter the server pushed the device (IFCA,
``server/clusters.py``; the global until one comes). Where the server publishes every cluster
adapter (``[server] cluster_assign = "loss"``), the canary scores them all at the start of a
round, the update reports their losses (``cluster_losses``: the server puts the device in the
cluster that fits it best), and ``start = "cluster"`` starts from the best of them.
With ``share = "lora_a"`` (FedSA-LoRA) the device uploads only the change of the A matrices and
takes only A from what the server pushes: B never leaves the device.

A zeroth-order device starts from v0, which it derives from the seed, and follows the rounds
through their seeds (``adapter/global/seeds``); it fetches the dense adapter only when it falls
behind. Other devices take the dense adapter (``adapter/global``). What leaves the device
(privacy, codecs, secure masks) is ``edge_sdk/uplink.py``'s.

A window device (``lora_window = K``) may join a fleet whose adapter reaches deeper: it tunes
and uploads its window's layers (the server averages each tensor over the devices that hold
it), and runs the layers below under the fleet's adapter (:func:`use`), which needs an engine
that applies an adapter in its prefix (the lean torch engine, llama.cpp's window engine).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import PARTS, FlatLayout
from fleetune.edge_sdk.canary import Canary
from fleetune.edge_sdk.data import ClientData, split_validation
from fleetune.edge_sdk.errors import ConfigError, PayloadError, TransportError
from fleetune.edge_sdk.evaluation import DeviceReport
from fleetune.edge_sdk.memory import peak_rss_mb
from fleetune.edge_sdk.protocol import (
    MAX_CLUSTERS,
    Announcement,
    GlobalAdapter,
    GlobalSeeds,
    PersonalAdapter,
    SecAggRound,
    Unmask,
    Update,
    decode_global,
)
from fleetune.edge_sdk.tuners.base import Job, Tensors
from fleetune.edge_sdk.tuners.zo import apply_run
from fleetune.edge_sdk.uplink import privatize, reveal, upload, upload_masked

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import PrefixAdapted
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.data import ClientText

log = logging.getLogger(__name__)


@dataclass
class Current:
    """The global adapter a device holds, and its version."""

    version: int
    tensors: Tensors


def advance(
    client: EdgeClient, pushed: GlobalAdapter | GlobalSeeds, held: Current | None
) -> Current | None:
    """The adapter after a push, or ``None`` when seeds do not apply on top of what is held
    (the device then needs the dense adapter)."""
    if isinstance(pushed, GlobalAdapter):
        return Current(pushed.version, pushed.tensors)
    if held is None or held.version != pushed.from_version:
        return None
    spec = pushed.spec or client.spec
    layout = client.layout if spec == client.spec else FlatLayout(spec, client.base)
    if any(name not in held.tensors for name, _, _ in layout.entries):
        return None  # held in the window's layout only (v0): the dense adapter is needed
    tuned = layout.indices(pushed.seeds.params)
    theta = apply_run(layout.flatten(held.tensors), tuned, pushed.seeds)
    return Current(pushed.version, layout.unflatten(theta))


def join(client: EdgeClient, announcement: Announcement) -> None:
    """A fleet that runs another base or adapter is a ``ConfigError`` (the run ends); so is a
    fleet that tunes layers below this device's window when its engine cannot run them under
    the fleet's adapter."""
    announcement.check(client.fleet)
    fleet = LoraSpec.from_dict(announcement.adapter) if announcement.adapter else client.spec
    if fleet != client.spec and not client.backend.capabilities.prefix_adapter:
        raise ConfigError(
            f"{client.device} tunes the top {client.spec.window} layers, and the fleet's "
            f"adapter reaches below them ({announcement.adapter}): the layers below must run "
            f"under the fleet's adapter, which {type(client.backend).__name__} cannot do (its "
            'prefix is the frozen base). Use backend = "torch" or "llamacpp", or a fleet '
            f"with lora_window = {client.spec.window}"
        )


def use(client: EdgeClient, tensors: Tensors) -> Tensors:
    """Set a fleet adapter in the engine and return this device's share of it: all of it, or,
    on a window device in a fleet that tunes deeper, its window's tensors, the layers below
    going to the engine's prefix (so the states entering the window are the fleet model's)."""
    mine = client.fleet.narrow(tensors)
    if client.backend.capabilities.prefix_adapter:
        below = {k: v for k, v in tensors.items() if k not in mine}
        cast("PrefixAdapted", client.backend).set_prefix_adapter(below)
    client.backend.set_adapter(mine)
    return mine


def follow_rounds(client: EdgeClient, item: ClientText, data: ClientData) -> DeviceReport:
    """Take part in rounds until the server announces the end; return what was measured."""
    topics, backend = client.topics, client.backend
    report = DeviceReport(client.device, item.client)
    init = init_lora(client.spec, client.base)
    backend.set_adapter(init)
    report.ppl_base = client.evaluate(data.heldout)
    train, val = split_validation(data.train)  # the canary's windows are never trained on
    data = ClientData(data.client, train, data.heldout)
    canary = Canary(
        lambda tensors: validation_loss(client, tensors, val),
        init,
        client.device,
        keep=lambda served: client.store.save_served(
            PersonalAdapter(served.tensors, version=served.version, local=True).encode(
                client.fleet, "f32", sender=client.device
            )
        ),
        share=client.config.tuning.blend,
    )
    restore(client, canary)
    log.info(
        "%s (%s): base perplexity %.1f on %d held-out windows",
        client.device,
        item.client,
        report.ppl_base,
        len(data.heldout),
    )
    transport = client.connect()
    report.bytes_up += client.deliver()  # anything left from before a reboot
    zo = client.config.tuning.tuner == "zo"
    current: Current | None = Current(0, init) if zo else None
    dense = not zo
    transport.subscribe(topics.global_seeds if zo else topics.global_adapter)
    transport.subscribe(topics.personal(client.device))  # the server's cluster adapter
    transport.subscribe(topics.all_clusters)  # every cluster's (cluster_assign = "loss")
    transport.subscribe(topics.secagg_unmask)
    masked: dict[int, SecAggRound] = {}  # secure rounds this device uploaded in, for reveals
    announcement: Announcement | None = None
    done_round = 0
    wait = client.config.sync.round_wait_s
    while True:
        msg = client.next_push(wait, report)
        if msg is None:
            raise TransportError(f"{client.device}: no message from the server for {wait:.0f} s")
        report.bytes_down += len(msg.payload)
        try:
            payload = client.receive(msg)
            if payload is None:
                continue
            if msg.topic == topics.round:
                announcement = Announcement.decode(payload)
                join(client, announcement)  # another base or adapter ends the run
                # a round may stay open for the server's timeout: wait at least that long
                wait = max(client.config.sync.round_wait_s, announcement.timeout_s + 60)
            elif msg.topic in (topics.global_adapter, topics.global_seeds):
                pushed = advance(client, decode_global(payload, client.fleet), current)
                if pushed is not None and current is not None and pushed.version < current.version:
                    raise PayloadError(
                        f"adapter v{pushed.version} is older than the v{current.version} held "
                        "(a replay)",
                        "replay",
                    )
                if pushed is not None:
                    current = pushed
                    client.store.save_adapter(payload)
            elif msg.topic == topics.secagg_unmask:
                reveal(client, Unmask.decode(payload), masked)
            elif msg.topic == topics.personal(client.device):
                personal = PersonalAdapter.decode(payload, client.fleet)
                cluster = own_b(client, personal.tensors, canary.served.tensors)
                client.cluster_adapter = cluster
                canary.offer({"cluster": cluster}, personal.version, client.tuned_adapter)
            elif topics.is_cluster(msg.topic):
                take_cluster(client, msg.topic, payload)
        except PayloadError as err:
            client.refuse(msg, err)
            continue
        if announcement is None:
            continue
        wanted = announcement.adapter_version
        if current is None or current.version != wanted:
            if current is not None and current.version > wanted:
                continue  # an old announcement; the new one is on its way
            if not dense:  # behind: take the retained dense adapter once
                transport.subscribe(topics.global_adapter)
                dense = True
            continue
        if dense and zo:
            transport.unsubscribe(topics.global_adapter)
            dense = False
        if announcement.done:
            mine = use(client, current.tensors)
            report.ppl_final = client.evaluate(data.heldout)
            report.history.append({"round": announcement.round, "ppl_global": report.ppl_final})
            offered = {"global": own_b(client, mine, canary.served.tensors)}
            offered |= published(client, current.version, canary.served.tensors)
            serve(client, canary, offered, current.version, data, report)
            log.info(
                "%s: final global adapter v%d, perplexity %.1f; serving %s, perplexity %.1f",
                client.device,
                current.version,
                report.ppl_final,
                report.served,
                report.ppl_served,
            )
            return report
        if announcement.round <= done_round:
            continue
        report.bytes_up += run_round(client, announcement, current, data, report, canary, masked)
        done_round = announcement.round


def restore(client: EdgeClient, canary: Canary) -> None:
    """Offer the canary the adapter the device served before a restart (rescored: it is served
    only if it still beats the base model on the validation text)."""
    kept = client.store.load_served()
    if kept is None:
        return
    try:
        saved = PersonalAdapter.decode(kept, client.fleet)
    except PayloadError as err:
        log.warning("%s: the served adapter on disk is not usable (%s)", client.device, err)
        return
    canary.offer({"kept": saved.tensors}, saved.version)


def run_round(
    client: EdgeClient,
    announcement: Announcement,
    current: Current,
    data: ClientData,
    report: DeviceReport,
    canary: Canary,
    masked: dict[int, SecAggRound],
) -> int:
    """Tune from the served (or the round's) adapter, let the canary weigh the result against
    what is served, and queue the change; returns the bytes sent."""
    round_ = announcement.round
    mine = use(client, current.tensors)
    ppl_global = report.ppl_base if current.version == 0 else client.evaluate(data.heldout)
    fresh = published(client, current.version, canary.served.tensors)
    offered = {"global": own_b(client, mine, canary.served.tensors)} | fresh
    losses = canary.offer(offered, current.version, client.tuned_adapter).losses
    cluster_losses = {name.split(":")[1]: round(losses[name], 6) for name in fresh}
    best = min(fresh, key=losses.__getitem__, default=None)
    cluster = client.cluster_adapter if best is None else fresh[best]
    starts = {"served": canary.served.tensors, "cluster": cluster, "global": mine}
    began = client.config.tuning.start
    if starts[began] is None:  # no cluster adapter yet
        began = "global"
    start = cast("Tensors", starts[began])
    if client.config.tuning.share == "lora_a":  # FedSA: the fleet's A, this device's B
        start = with_a(mine, start)
    job = Job(client.device, round_, pool=announcement.zo)
    tuned = client.tuner.tune(client.backend, data, start, job, client.progress(round_))
    client.tuned_adapter = tuned.adapter
    tuned.metrics["peak_rss_mb"] = peak = peak_rss_mb()
    budget = client.config.device.memory_budget_mb
    if budget and peak > budget:
        log.warning(
            "%s round %d: peak RSS %.0f MB is over memory_budget_mb = %g (the footprint "
            "estimate was low for this device: lower batch_size or seq_len)",
            client.device,
            round_,
            peak,
            budget,
        )
    report.ppl_local = client.evaluate(data.heldout)
    report.history.append(
        {"round": round_, "ppl_global": ppl_global, "ppl_local": report.ppl_local}
    )
    log.info(
        "%s round %d: perplexity %.1f under global v%d → %.1f after %d %s steps from %s",
        client.device,
        round_,
        ppl_global,
        current.version,
        report.ppl_local,
        tuned.metrics["steps"],
        client.tuner.name,
        f"the served {canary.served.name}" if began == "served" else f"the {began}",
    )
    choice = canary.offer({"local": tuned.adapter}, current.version)
    private = privatize(client, tuned, round_)
    if private is None:
        return 0
    tuned, dp = private
    if announcement.secagg is not None:
        if client.device not in announcement.secagg.cohort:
            log.warning("%s: not in round %d's secure cohort; not uploading", client.device, round_)
            return 0
        sent = upload_masked(
            client, announcement, current.version, tuned, start, len(data.train), masked
        )
    else:
        # under local DP only the noised delta speaks of the data: no losses or perplexities
        metrics = (
            {"steps": tuned.metrics["steps"], **dp}
            if dp
            else {
                "ppl_local": report.ppl_local,
                "ppl_global": ppl_global,
                "start": began,
                **tuned.metrics,
                **choice.metrics(),
                **({"cluster_losses": cluster_losses} if cluster_losses else {}),
            }
        )
        update = Update(
            client.device,
            round_,
            current.version,
            len(data.train),
            delta=tuned.delta,
            seeds=tuned.seeds,
            metrics=metrics,
            part=client.config.tuning.share,
        )
        sent = upload(client, update)
    if dp:
        client.store.released()
    return sent


def published(client: EdgeClient, version: int, served: Tensors) -> dict[str, Tensors]:
    """The cluster adapters of ``version`` the server published (``cluster_assign = "loss"``),
    as the canary's candidates ``cluster:{c}``."""
    return {
        f"cluster:{c}": own_b(client, adapter.tensors, served)
        for c, adapter in sorted(client.cluster_adapters.items())
        if adapter.version == version
    }


def take_cluster(client: EdgeClient, topic: str, payload: bytes) -> None:
    """Keep a cluster adapter the server published on ``adapter/cluster/{c}`` (the latest of
    each cluster; the round loop scores those of the round's version)."""
    number = topic.rpartition("/")[2]
    if not number.isdecimal() or int(number) >= MAX_CLUSTERS:
        raise PayloadError(f"{topic}: a cluster is numbered 0..{MAX_CLUSTERS - 1}")
    adapter = PersonalAdapter.decode(payload, client.fleet)
    if adapter.cluster != int(number):
        raise PayloadError(f"{topic} carries the adapter of cluster {adapter.cluster}")
    held = client.cluster_adapters.get(adapter.cluster)
    if held is None or adapter.version >= held.version:
        client.cluster_adapters[adapter.cluster] = adapter


def own_b(client: EdgeClient, pushed: Tensors, served: Tensors) -> Tensors:
    """What the device makes of a pushed adapter: all of it, or with ``share = "lora_a"`` its A
    and the B the device serves (the server's B is never taken)."""
    return with_a(pushed, served) if client.config.tuning.share == "lora_a" else pushed


def with_a(a_from: Tensors, rest: Tensors) -> Tensors:
    """The A matrices of ``a_from``, everything else from ``rest``."""
    return {k: a_from[k] if PARTS["lora_a"] in k else v for k, v in rest.items()}


def validation_loss(client: EdgeClient, tensors: Tensors, windows: np.ndarray) -> float:
    """Mean loss of an adapter on the canary's validation windows."""
    client.backend.set_adapter(tensors)
    return math.log(client.evaluate(windows))


def serve(
    client: EdgeClient,
    canary: Canary,
    candidates: dict[str, Tensors],
    version: int,
    data: ClientData,
    report: DeviceReport,
) -> None:
    """The canary's last word: the adapter the device serves from now on, and its held-out
    perplexity (for the report: the canary never sees held-out text)."""
    canary.offer(candidates, version, client.tuned_adapter)
    client.backend.set_adapter(canary.served.tensors)
    report.served = canary.served.name
    report.ppl_served = client.evaluate(data.heldout)
