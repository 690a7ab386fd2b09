"""The device's round loop: follow the server's retained announcements, start each round from
the adapter it names, tune, and upload through the outbox.

A zeroth-order device starts from v0, which it derives from the seed, and follows the rounds
through their seeds (``adapter/global/seeds``); it fetches the dense adapter only when it falls
behind. Other devices take the dense adapter (``adapter/global``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.canary import Canary
from fleetune.edge_sdk.data import ClientData, split_validation
from fleetune.edge_sdk.errors import PayloadError, TransportError
from fleetune.edge_sdk.evaluation import DeviceReport
from fleetune.edge_sdk.protocol import (
    Announcement,
    GlobalAdapter,
    GlobalSeeds,
    PersonalAdapter,
    Update,
    decode_global,
)
from fleetune.edge_sdk.tuners.base import Job, Tensors
from fleetune.edge_sdk.tuners.zo import apply_run

if TYPE_CHECKING:
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
    tuned = client.layout.indices(pushed.seeds.params)
    theta = apply_run(client.layout.flatten(held.tensors), tuned, pushed.seeds)
    return Current(pushed.version, client.layout.unflatten(theta))


def follow_rounds(client: EdgeClient, item: ClientText, data: ClientData) -> DeviceReport:
    """Take part in rounds until the server announces the end; return what was measured."""
    topics, backend = client.topics, client.backend
    report = DeviceReport(client.device, item.client)
    init = init_lora(client.spec, client.base)
    backend.set_adapter(init)
    report.ppl_base = client.evaluate(data.heldout)
    train, val = split_validation(data.train)  # the canary's windows are never trained on
    data = ClientData(data.client, train, data.heldout)
    canary = Canary(lambda tensors: validation_loss(client, tensors, val), init, client.device)
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
                announcement.check(client.fleet)  # another base or adapter ends the run
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
            elif msg.topic == topics.personal(client.device):
                personal = PersonalAdapter.decode(payload, client.fleet)
                canary.offer({"cluster": personal.tensors}, personal.version)
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
            backend.set_adapter(current.tensors)
            report.ppl_final = client.evaluate(data.heldout)
            report.history.append({"round": announcement.round, "ppl_global": report.ppl_final})
            serve(client, canary, {"global": current.tensors}, current.version, data, report)
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
        report.bytes_up += run_round(client, announcement, current, data, report, canary)
        done_round = announcement.round


def run_round(
    client: EdgeClient,
    announcement: Announcement,
    current: Current,
    data: ClientData,
    report: DeviceReport,
    canary: Canary,
) -> int:
    """Tune from the round's adapter, let the canary weigh the result against what is served,
    and queue the update; returns the bytes sent."""
    round_ = announcement.round
    client.backend.set_adapter(current.tensors)
    ppl_global = report.ppl_base if current.version == 0 else client.evaluate(data.heldout)
    job = Job(client.device, round_, pool=announcement.zo)
    tuned = client.tuner.tune(client.backend, data, current.tensors, job, client.progress(round_))
    client.tuned_adapter = tuned.adapter
    report.ppl_local = client.evaluate(data.heldout)
    report.history.append(
        {"round": round_, "ppl_global": ppl_global, "ppl_local": report.ppl_local}
    )
    log.info(
        "%s round %d: perplexity %.1f under global v%d → %.1f after %d %s steps",
        client.device,
        round_,
        ppl_global,
        current.version,
        report.ppl_local,
        tuned.metrics["steps"],
        client.tuner.name,
    )
    offered = {"global": current.tensors, "local": tuned.adapter}
    choice = canary.offer(offered, current.version)
    update = Update(
        client.device,
        round_,
        current.version,
        len(data.train),
        delta=tuned.delta,
        seeds=tuned.seeds,
        metrics={
            "ppl_local": report.ppl_local,
            "ppl_global": ppl_global,
            **tuned.metrics,
            **choice.metrics(),
        },
    )
    payload = update.encode(client.fleet, client.config.sync.uplink_encoding)
    client.store.put(client.topics.update(client.device), payload)
    return client.deliver()


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
    canary.offer(candidates, version)
    client.backend.set_adapter(canary.served.tensors)
    report.served = canary.served.name
    report.ppl_served = client.evaluate(data.heldout)
