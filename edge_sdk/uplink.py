"""What leaves a device after a round (``edge_sdk/rounds.py`` decides when): local
differential privacy on the update (``edge_sdk/privacy.py``), the uplink codec with error
feedback, a secure round's masked upload and its reveals (``edge_sdk/secagg.py``), and the
outbox that keeps it all until the broker has it."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.codec import parse_encoding
from fleetune.edge_sdk.codec.feedback import ErrorFeedback
from fleetune.edge_sdk.privacy import clip, epsilon, gaussian, within_budget
from fleetune.edge_sdk.protocol import Announcement, Reveal, SecAggRound, Unmask, Update
from fleetune.edge_sdk.secagg import masked_update, pair_seed
from fleetune.edge_sdk.tuners.base import Tensors, Tuned

if TYPE_CHECKING:
    from fleetune.edge_sdk.client import EdgeClient

log = logging.getLogger(__name__)


def privatize(client: EdgeClient, tuned: Tuned, round_: int) -> tuple[Tuned, dict] | None:
    """With ``[privacy]`` on: the update clipped and noised, and the epsilon it brings the
    device to; ``None`` when one more upload would spend beyond the budget."""
    privacy = client.config.privacy
    if not privacy.on or tuned.delta is None:
        return tuned, {}
    done = client.store.releases()
    sigma, delta = privacy.noise_multiplier, privacy.delta
    if not within_budget(sigma, done, delta, privacy.epsilon_budget):
        log.warning(
            "%s round %d: privacy budget spent (epsilon %.2f of %.2f): this round's tuning "
            "stays on the device",
            client.device,
            round_,
            epsilon(sigma, done, delta),
            privacy.epsilon_budget,
        )
        return None
    clipped, _ = clip(tuned.delta, privacy.clip_norm)
    noisy = gaussian(clipped, sigma * privacy.clip_norm, np.random.default_rng())
    return replace(tuned, delta=noisy), {"epsilon": epsilon(sigma, done + 1, delta)}


def upload(client: EdgeClient, update: Update) -> int:
    """Queue ``update`` in the uplink encoding, with what earlier lossy uplinks dropped added
    (error feedback), and send what the outbox holds; returns the bytes sent."""
    sync = client.config.sync
    feedback = None
    if (
        update.delta is not None
        and sync.error_feedback
        and parse_encoding(sync.uplink_encoding).lossy
    ):
        feedback = ErrorFeedback(client.store.root / "residual.safetensors")
        update = replace(update, delta=feedback.add(update.delta))
    payload = update.encode(client.fleet, sync.uplink_encoding)
    client.store.put(client.topics.update(client.device), payload)
    if feedback is not None and update.delta is not None:  # what the server decodes, it has
        feedback.keep(update.delta, codec.decode(payload)[1])
    return client.deliver()


def upload_masked(
    client: EdgeClient,
    announcement: Announcement,
    version: int,
    tuned: Tuned,
    start: Tensors,
    examples: int,
    masked: dict[int, SecAggRound],
) -> int:
    """A secure round (``edge_sdk/secagg.py``): the change, in fixed point under pair masks with
    the rest of the cohort; it says nothing else (no losses, no perplexities)."""
    secagg, round_ = announcement.secagg, announcement.round
    assert secagg is not None
    change = (
        tuned.delta if tuned.delta is not None else {k: tuned.adapter[k] - start[k] for k in start}
    )
    vector = masked_update(
        client.layout.flatten(change),
        client.device,
        client.masking_key,
        secagg.publics(),
        client.config.sync.fleet,
        round_,
        secagg.bound,
        secagg.scale,
    )
    update = Update(
        client.device,
        round_,
        version,
        examples,
        metrics={"steps": tuned.metrics["steps"]},
        masked=vector,
    )
    client.store.put(client.topics.update(client.device), update.encode(client.fleet))
    masked[round_] = secagg
    return client.deliver()


def reveal(client: EdgeClient, unmask: Unmask, masked: dict[int, SecAggRound]) -> None:
    """A survivor's answer to the server: its pair seeds with the devices that dropped, for a
    round it uploaded in, once."""
    cohort = masked.pop(unmask.round, None)
    if cohort is None or client.device in unmask.dropped:
        return
    publics, fleet = cohort.publics(), client.config.sync.fleet
    seeds = {
        d: pair_seed(client.masking_key, publics[d], fleet, unmask.round).hex()
        for d in unmask.dropped
        if d in publics and d != client.device
    }
    log.info(
        "%s: revealing pair seeds with %s (round %d)", client.device, sorted(seeds), unmask.round
    )
    client.store.put(
        client.topics.reveal(client.device), Reveal(client.device, unmask.round, seeds).encode()
    )
    client.deliver()
