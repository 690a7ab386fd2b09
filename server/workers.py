"""Aggregator workers: N processes share the fleet's update stream through an MQTT shared
subscription (``$share/{group}/fleetune/{fleet}/update/+``; mosquitto, EMQX, VerneMQ and HiveMQ
support them), each checking, saving and summing the updates it gets; one coordinator (the
``FleetServer`` with ``[server] workers = N``, leader by a lease in the registry's database)
announces rounds, asks for the partial sums once the workers' claims reach the quorum, folds
them and pushes. The fold is FedAvg's: ``global += sum_i w_i delta_i / sum_i w_i`` over every
worker's updates (float64 partial sums, so the result does not depend on how the stream was
split); ZO seeds are summed per index and replayed once.

A device's second update in a round may reach another worker: the registry's claim (one row per
round and device) lets only the first count. Chunks of a large update are read by every worker
(a plain subscription) and the manifest by one (shared), so whichever worker gets the manifest
holds all of its chunks. Partial sums travel on ``server/partial/{worker}`` (chunked like any
large payload). A worker's accepted updates are on disk (``<state_dir>/workers/{name}``) before
they are acknowledged; a worker that dies before handing in its partial loses that round's sum
(its updates are on disk, not replayed yet), and the coordinator folds the others' after the
round's timeout.

Workers need ``strategy = "fedavg"`` without clipping, clusters, a mixture basis, secure
aggregation or DP: those see every update at once or per device, which a partial sum does not.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import AggregationError, FleetuneError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.protocol import Announcement, Fleet
from fleetune.edge_sdk.protocol import Update as Wire
from fleetune.edge_sdk.signing import Keyring
from fleetune.edge_sdk.store import atomic_write
from fleetune.edge_sdk.transport.base import Message, Transport
from fleetune.edge_sdk.transport.chunks import ChunkedTransport, chunk_topic
from fleetune.edge_sdk.transport.topics import Topics, check_id
from fleetune.server.buffered import discount
from fleetune.server.config import ServerConfig
from fleetune.server.metrics import reported_perplexity
from fleetune.server.registry import Registry
from fleetune.server.seeds import SeedPools
from fleetune.server.strategy import Update
from fleetune.server.strategy.base import Aggregate, Seeds, Tensors
from fleetune.server.strategy.fedavg import fold, running_weight
from fleetune.server.validation import check_update

if TYPE_CHECKING:
    from fleetune.server.app import FleetServer, RoundResult

log = logging.getLogger(__name__)
PARTIAL = b"FLTP"
MAX_EARLY = 10_000  # updates held for a round not announced here yet
_HEAD = struct.Struct(">4sI")


@dataclass
class Partial:
    """One worker's running FedAvg sum for one round. Each tensor is averaged over the updates
    that hold it: a window device's update holds its window's layers only, so ``cover`` keeps
    the weight summed per layout entry (``None`` while every update held every entry: then each
    entry's weight is ``weight``)."""

    round: int
    size: int
    total: np.ndarray = field(init=False)  # sum of weight x flat dense delta, float64
    weight: float = 0.0
    seeds: dict[int, float] = field(default_factory=dict)  # sum of weight x coefficient
    devices: list[str] = field(default_factory=list)
    cover: np.ndarray | None = None  # [layout entries] float64 summed weight, or None (uniform)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.size, dtype=np.float64)

    def add(self, update: Update, weight: float, layout: FlatLayout) -> None:
        held = np.ones(len(layout.entries), dtype=bool)
        if update.delta is not None:  # tensor by tensor into the sum: no flat temporaries
            for k, (name, shape, offset) in enumerate(layout.entries):
                if name not in update.delta:  # below a window device's window
                    held[k] = False
                    continue
                part = self.total[offset : offset + math.prod(shape)]
                part += weight * update.delta[name].reshape(-1)
        for index, coef in (update.seeds or {}).items():
            self.seeds[index] = self.seeds.get(index, 0.0) + weight * coef
        if self.cover is not None or not held.all():
            self.cover = self._covered(len(held)) + weight * held
        self.weight += weight
        self.devices.append(update.device)

    def _covered(self, entries: int) -> np.ndarray:
        return self.cover if self.cover is not None else np.full(entries, self.weight)

    def merge(self, other: Partial) -> None:
        if self.cover is not None or other.cover is not None:
            entries = len(self.cover if self.cover is not None else other.cover)  # type: ignore[arg-type]
            self.cover = self._covered(entries) + other._covered(entries)
        self.total += other.total
        for index, coef in other.seeds.items():
            self.seeds[index] = self.seeds.get(index, 0.0) + coef
        self.weight += other.weight
        self.devices += other.devices

    def fold(
        self, current: Tensors, layout: FlatLayout, replay: Callable[[Seeds, int], Tensors]
    ) -> Aggregate | None:
        """The round's FedAvg from this sum (``server/strategy/fedavg.py:fold``)."""
        return fold(
            current,
            layout,
            self.total,
            self.weight,
            self.seeds,
            lambda s: replay(s, self.round),
            self.cover,
        )

    def encode(self, worker: str) -> bytes:
        head = json.dumps(
            {
                "worker": worker,
                "round": self.round,
                "weight": self.weight,
                "devices": self.devices,
                "seeds": [[i, c] for i, c in sorted(self.seeds.items())],
                "size": self.size,
                "cover": None if self.cover is None else self.cover.tolist(),
            }
        ).encode()
        return _HEAD.pack(PARTIAL, len(head)) + head + self.total.tobytes()

    @classmethod
    def decode(cls, payload: bytes, size: int) -> tuple[str, Partial]:
        """(worker, partial); ``PayloadError`` names what is wrong."""
        if len(payload) < _HEAD.size or payload[:4] != PARTIAL:
            raise PayloadError("not a partial sum")
        _, n = _HEAD.unpack_from(payload)
        try:
            head = json.loads(payload[_HEAD.size : _HEAD.size + n])
            body = np.frombuffer(payload[_HEAD.size + n :], dtype=np.float64)
            if head["size"] != size or body.size != size:
                raise PayloadError(f"a partial sum of {body.size} values, the adapter has {size}")
            out = cls(int(head["round"]), size)
            out.total[:] = body
            out.weight = float(head["weight"])
            out.seeds = {int(i): float(c) for i, c in head["seeds"]}
            out.devices = [str(d) for d in head["devices"]]
            if head.get("cover") is not None:  # absent in sums saved before windows mixed
                out.cover = np.array(head["cover"], dtype=np.float64)
            return str(head["worker"]), out
        except (ValueError, KeyError, TypeError) as err:
            raise PayloadError(f"a malformed partial sum: {err}") from err


class AggregatorWorker:
    """One of the workers sharing the update stream; :meth:`run` until ``stop`` is set."""

    def __init__(
        self,
        config: ServerConfig,
        base: BaseManifest,
        name: str,
        transport: Transport | None = None,
    ) -> None:
        self.config, self.name = config, check_id("worker", name)
        self.topics = Topics(config.fleet)
        spec = config.spec
        self.fleet, self.layout = Fleet(base, spec), FlatLayout(spec, base)
        self.seeds = SeedPools(config.fleet, self.layout, config.zo_pool_size, config.zo_params)
        root = Path(config.state_dir)
        key = bytes.fromhex((root / "fleet-key.pub").read_text().strip())
        self.keyring = Keyring([key])  # announcements are signed by the coordinator
        self.registry = Registry(config.database or root / "registry.sqlite")
        self.folder = root / "workers" / self.name
        if transport is None:
            transport = config.mqtt(f"{config.fleet}-worker-{self.name}")
        self.transport = ChunkedTransport(
            transport, config.max_message_bytes, spool=self.folder / "chunks"
        )
        self.announcement: Announcement | None = None
        self.partial: Partial | None = None  # of the announced round, until it is flushed
        self.early: list[Message] = []  # updates for a round not announced here yet
        self.accepted = 0

    def connect(self) -> None:
        inner, group = self.transport.inner, self.config.worker_group
        inner.subscribe(f"$share/{group}/{self.topics.all_updates}")
        inner.subscribe(chunk_topic(self.topics.all_updates, "+"))  # every worker: all chunks
        inner.subscribe(self.topics.round)
        inner.subscribe(self.topics.flush)
        self.transport.connect()

    def run(self, stop: threading.Event, ready: Callable[[], object] = lambda: None) -> None:
        """Take messages until ``stop`` is set; ``ready`` is called once connected."""
        self.connect()
        ready()
        try:
            while not stop.is_set():
                msg = self.transport.recv(timeout=0.2)
                if msg is None:
                    continue
                for done in self.take(msg):
                    self.transport.ack(done)
        finally:
            self.transport.close()
            self.registry.close()

    def take(self, msg: Message) -> list[Message]:
        """Handle one message; returns those now done with (to acknowledge). An update for a
        round this worker has not seen announced yet (the device heard first) waits for it,
        unacknowledged."""
        if msg.topic == self.topics.round:
            self._announced(msg.payload)
            early, self.early = self.early, []
            return [msg, *(m for m in early if not self._update(m))]
        if msg.topic == self.topics.flush:
            self._flush(msg.payload)
        elif self._update(msg):
            return []
        return [msg]

    def _announced(self, payload: bytes) -> None:
        try:
            announcement = Announcement.decode(self.keyring.open(payload, "announcement"))
        except PayloadError as err:
            log.warning("worker %s: ignoring an announcement: %s", self.name, err)
            return
        self.announcement = announcement
        if announcement.done:
            self.partial = None
        elif self.partial is None or self.partial.round != announcement.round:
            self.partial = Partial(announcement.round, self.layout.size)

    def _flush(self, payload: bytes) -> None:
        try:
            round_ = int(json.loads(payload)["round"])
        except (ValueError, KeyError, TypeError):
            log.warning("worker %s: ignoring a malformed flush", self.name)
            return
        partial = self.partial if self.partial and self.partial.round == round_ else None
        out = partial or Partial(round_, self.layout.size)  # nothing this round: an empty sum
        self.transport.publish(self.topics.partial(self.name), out.encode(self.name))
        if partial is not None:
            self.partial = None  # closed: a later update of this round is refused
        log.info("worker %s: round %d: %d updates handed in", self.name, round_, len(out.devices))

    def _update(self, msg: Message) -> bool:
        """Check, claim, save and sum one update; ``True`` if it waits for its round."""
        announcement, partial = self.announcement, self.partial
        try:
            device = self.topics.device_of(msg.topic)
            ahead = Wire.decode(msg.payload, self.fleet).round > (
                announcement.round if announcement is not None else 0
            )
            if ahead and len(self.early) < MAX_EARLY:
                self.early.append(msg)
                return True
            if announcement is None or partial is None or partial.round != announcement.round:
                raise PayloadError("no round is collecting updates", "round")
            update = check_update(
                msg.payload,
                device,
                self.fleet,
                announcement.round,
                announcement.adapter_version,
                self.seeds.pool,
                set(),
                max_staleness=self.config.staleness_allowed,
                windows=self.seeds.replay,
            )
            if not self.registry.claim(announcement.round, device, self.name):
                raise PayloadError(
                    f"a second update from {device} in round {announcement.round}", "duplicate"
                )
        except FleetuneError as err:
            log.warning("worker %s: rejected an update on %s: %s", self.name, msg.topic, err)
            round_ = announcement.round if announcement is not None else 0
            self.registry.log_update(
                round_, msg.topic.rsplit("/", 1)[-1], len(msg.payload), 0, False, str(err)
            )
            return False
        assert partial is not None  # checked above
        folder = self.folder / f"r{partial.round:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{device}.fltn", msg.payload)
        update = discount(update, partial.round, self.config.staleness_exponent, self.seeds.replay)
        partial.add(
            update, running_weight(update.num_examples, self.config.max_examples), self.layout
        )
        self.registry.log_update(partial.round, device, len(msg.payload), update.num_examples, True)
        if (ppl := reported_perplexity(update.metrics)) is not None:
            self.registry.log_perplexity(partial.round, device, ppl)  # the dashboard's plot
        self.accepted += 1
        return False


class Coordinator:
    """The ``FleetServer``'s side with ``[server] workers = N``: hold the lease, wait for the
    workers' claims to reach the quorum, ask for their partial sums and fold them."""

    def __init__(self, server: FleetServer) -> None:
        self.server = server
        self.holder = f"{server.config.fleet}-{uuid.uuid4().hex[:12]}"
        self.partials: dict[int, dict[str, Partial]] = {}

    def take_lead(self) -> None:
        """Wait (standby) until this coordinator holds the lease."""
        lease = self.server.config.leader_lease_s
        if not self.server.registry.lead(self.holder, lease):
            log.info("coordinator %s: standby while another holds the lease", self.holder)
            while not self.server.registry.lead(self.holder, lease):
                time.sleep(lease / 4)
        log.info("coordinator %s: leading", self.holder)

    def renew(self) -> None:
        if not self.server.registry.lead(self.holder, self.server.config.leader_lease_s):
            raise AggregationError(f"coordinator {self.holder} lost its lease to another")

    def resign(self) -> None:
        self.server.registry.resign(self.holder)

    def keep(self, msg: Message) -> None:
        try:
            worker, partial = Partial.decode(msg.payload, self.server.layout.size)
        except PayloadError as err:
            log.warning("ignoring a partial sum on %s: %s", msg.topic, err)
            return
        self.partials.setdefault(partial.round, {})[worker] = partial

    def gather(self, round_: int, result: RoundResult, deadline: float) -> Aggregate | None:
        """The round's fold once the claims reach the quorum (or at ``deadline``) and every
        worker handed in its sum (or the round's timeout passed again); ``None`` if empty."""
        server, config = self.server, self.server.config
        while server.registry.claimed(round_) < config.quorum and time.monotonic() < deadline:
            server._idle(min(deadline, time.monotonic() + 0.2))
            self.renew()
        server.transport.publish(server.topics.flush, json.dumps({"round": round_}).encode())
        wait = time.monotonic() + config.round_timeout_s
        while len(self.partials.get(round_, {})) < config.workers and time.monotonic() < wait:
            server._idle(min(wait, time.monotonic() + 0.2))
            self.renew()
        got = self.partials.pop(round_, {})
        if len(got) < config.workers:
            log.error("round %d: %d of %d workers handed in", round_, len(got), config.workers)
        for partial in got.values():
            result.accepted += partial.devices
        merged = Partial(round_, server.layout.size)
        for partial in got.values():
            merged.merge(partial)
        return merged.fold(server.current, server.layout, server.seeds.replay)
