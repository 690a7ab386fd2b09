"""The aggregation service: announce a round, collect updates until a quorum or a timeout,
aggregate, persist, and push the new global adapter (retained) to the fleet (in ``async`` mode,
:mod:`~fleetune.server.buffered`, the quorum is a buffer that also takes stale updates).
Long because the round is one sequence (route, rate-limit, check, save, acknowledge, aggregate,
push) that reads best in one place; each part's rules live in their own modules.

A bad update is refused with a logged reason (and a row in the registry); the round goes on.
Update checks are in :mod:`~fleetune.server.validation`, the seed pools in
:mod:`~fleetune.server.seeds`, the mixture service in :mod:`~fleetune.server.mixtures`, cluster
adapters in :mod:`~fleetune.server.clusters`, counters in :mod:`~fleetune.server.metrics`, what
is kept on disk in :mod:`~fleetune.server.state`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.bundle import cache_dir
from fleetune.edge_sdk.errors import (
    AggregationError,
    ConfigError,
    FleetuneError,
    PayloadError,
    TransportError,
)
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.privacy import epsilon, within_budget
from fleetune.edge_sdk.protocol import (
    Announcement,
    DeviceStatus,
    Fleet,
    GlobalAdapter,
    GlobalSeeds,
    Reveal,
    SecAggRound,
    SeedPool,
    SeedRun,
    Unmask,
)
from fleetune.edge_sdk.signing import Signer
from fleetune.edge_sdk.transport.base import Message, Transport
from fleetune.edge_sdk.transport.chunks import ChunkedTransport
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.blobs import BlobServer
from fleetune.server.buffered import discount
from fleetune.server.clusters import Clusters, encode_personal
from fleetune.server.config import ServerConfig, make_strategy
from fleetune.server.dashboard import Dashboard
from fleetune.server.metrics import Metrics, reported_perplexity
from fleetune.server.mixtures import MixtureService
from fleetune.server.provision import KEYS_SIGNED
from fleetune.server.registry import FLEET
from fleetune.server.secure import SecureRounds
from fleetune.server.seeds import SeedPools
from fleetune.server.state import ServerState
from fleetune.server.strategy import Update
from fleetune.server.strategy.base import Aggregate, Tensors
from fleetune.server.strategy.fedavg import running_weight
from fleetune.server.validation import check_update
from fleetune.server.workers import Coordinator, Partial

log = logging.getLogger(__name__)


BATCH = 256  # messages taken at once: their accepted updates share one sync and one transaction
BATCH_BYTES = 32 * 2**20  # ... and at most this many payload bytes (dense updates: ~60 of 521 KB)


@dataclass
class _Batch:
    """What a batch of messages brought, until its group commit."""

    accepted: list[tuple[Message, Update]] = field(default_factory=list)
    rows: list[tuple[str, int, int, bool, str]] = field(default_factory=list)  # registry rows

    def refuse(self, device: str, nbytes: int, reason: str) -> None:
        self.rows.append((device, nbytes, 0, False, reason))


@dataclass
class RoundResult:
    round: int
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (device, reason)
    version: int = 0
    seconds: float = 0.0


class FleetServer:
    def __init__(
        self, config: ServerConfig, base: BaseManifest, transport: Transport | None = None
    ) -> None:
        self.config, self.base = config, base
        self.topics = Topics(config.fleet)
        self.spec = config.spec
        self.fleet = Fleet(base, self.spec)
        self.strategy = make_strategy(config)
        self.layout = FlatLayout(self.spec, base)
        self.seeds = SeedPools(config.fleet, self.layout, config.zo_pool_size, config.zo_params)
        root = Path(config.state_dir) if config.state_dir else cache_dir() / "server" / config.fleet
        self.state_dir = root
        self.state = ServerState(root, self.fleet, config.database)
        self.registry = self.state.registry
        key_path = Path(config.signing_key) if config.signing_key else root / "signing-key.pem"
        self.signer = Signer.load_or_create(key_path)
        self.key_list = key_path.parent / KEYS_SIGNED  # a rotation's list (``fleet rotate-key``)
        (root / "fleet-key.pub").write_text(self.signer.public_hex + "\n")
        self.blobs: BlobServer | None = None
        self._transport = self._chunked(transport) if transport is not None else None
        self.version, self.first_round, self.current = self.state.resume()
        self.clusters = Clusters(
            config.clusters,
            config.cluster_step,
            self.strategy,
            self.layout,
            self.state.load_clusters(),
        )
        if self.version:
            log.info("resuming from adapter v%d at round %d", self.version, self.first_round)
        self.bytes_down = 0
        self.secure = (
            SecureRounds(config.secagg_bound, config.secagg_scale) if config.secagg else None
        )
        self.reveals: dict[int, dict[str, Reveal]] = {}  # secure rounds: survivors' pair seeds
        self._held: list[Message] = []  # received, not yet handled (past a round's quorum)
        self.coordinator = Coordinator(self) if config.workers else None
        self.metrics = Metrics()
        self.metrics.adapter_version.set(self.version)
        self.dashboard = (
            Dashboard(
                config.metrics_host, config.metrics_port, self.metrics.registry, self.snapshot
            )
            if config.metrics_port
            else None
        )
        self.mixtures = MixtureService(
            self.state,
            self.topics,
            self._publish_retained,
            config.basis_k,
            config.basis_encoding,
            config.downlink_encoding,
        )

    # -- messaging --------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise TransportError("the server is not connected: call run() or connect()")
        return self._transport

    def _chunked(self, transport: Transport) -> ChunkedTransport:
        """Payloads above the limit go in chunks; chunks received are on disk before they are
        acknowledged (``<state_dir>/chunks``)."""
        c = self.config
        if c.blob_port and self.blobs is None:
            self.blobs = BlobServer(self.state_dir / "blobs", c.blob_host, c.blob_port)
            log.info(
                "pushes above %d bytes go by reference: %s", c.max_message_bytes, self.blobs.url
            )
        spool = self.state_dir / "chunks"
        return ChunkedTransport(transport, c.max_message_bytes, spool=spool, blobs=self.blobs)

    def connect(self) -> Transport:
        if self._transport is None:
            self._transport = self._chunked(self.config.mqtt(f"{self.config.fleet}-server"))
        if self.coordinator is None:
            self._transport.subscribe(self.topics.all_updates)
        else:
            self._transport.subscribe(self.topics.all_partials)
        self._transport.subscribe(self.topics.all_status)
        self._transport.subscribe(self.topics.all_mixtures)
        if self.secure is not None:
            self._transport.subscribe(self.topics.all_reveals)
        self._transport.connect()
        if self.coordinator is not None:  # a session of this client id as a plain server
            self._transport.unsubscribe(self.topics.all_updates)  # subscribed to updates
        return self._transport

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Every push is signed with the fleet's key (``edge_sdk/signing.py``)."""
        signed = self.signer.sign(payload)
        self.transport.publish(topic, signed, retain=True)
        self.bytes_down += len(signed)
        self.metrics.push_bytes.inc(len(signed))

    def publish_keys(self) -> bool:
        """The key list of the last rotation (signed by the key before it), retained, so that
        devices adopt the current key before anything it signed reaches them."""
        if not self.key_list.exists():
            return False
        self.transport.publish(self.topics.keys, self.key_list.read_bytes(), retain=True)
        return True

    def publish_global(self, round_: int) -> int:
        pushed = GlobalAdapter(self.version, self.current, round_)
        payload = pushed.encode(self.fleet, self.config.downlink_encoding)
        self._publish_retained(self.topics.global_adapter, payload)
        return len(payload)

    def publish_seeds(self, round_: int, seeds: dict[int, float], dense_bytes: int) -> bool:
        """A zeroth-order round's result as its merged seeds, on top of the previous version:
        devices that followed the rounds rebuild the adapter from a few bytes per seed. Sent
        only when smaller than the dense adapter; a device without it fetches the dense one."""
        order = sorted(seeds)
        pool = self.pool(round_)
        run = SeedRun.from_pairs([(i, seeds[i]) for i in order], pool.pool_seed, pool.params)
        payload = GlobalSeeds(self.version, run, round_).encode(self.fleet)
        if len(payload) >= dense_bytes:
            log.info("round %d: %d seeds outweigh the dense adapter", round_, len(order))
            return False
        self._publish_retained(self.topics.global_seeds, payload)
        return True

    def pool(self, round_: int) -> SeedPool:
        """The round's seed pool (FedKSeed): devices draw their perturbations from it."""
        return self.seeds.pool(round_)

    def announce(self, round_: int, done: bool = False, secagg: SecAggRound | None = None) -> None:
        body = Announcement(
            round=round_,
            adapter_version=self.version,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            timeout_s=self.config.round_timeout_s,
            done=done,
            zo=self.pool(round_),
            secagg=secagg,
        )
        self.transport.publish(self.topics.round, self.signer.sign(body.encode()), retain=True)

    # -- rounds -----------------------------------------------------------------------------------
    def check_update(
        self, msg: Message, round_: int, seen: set[str], device: str | None = None
    ) -> Update:
        """Decode and validate one update; ``PayloadError`` says why it is refused."""
        device = device or self.topics.device_of(msg.topic)
        update = check_update(
            msg.payload,
            device,
            self.fleet,
            round_,
            self.version,
            self.pool,
            seen,
            shared_a=bool(self.config.basis_k),
            max_staleness=self.config.staleness_allowed,
            windows=self.seeds.replay if self.config.summable else None,
        )
        if self.secure is not None:
            self.secure.check(round_, device, update.masked)
        elif update.masked is not None:
            raise PayloadError(f"round {round_} is not securely aggregated", "round")
        c = self.config
        if c.strategy == "dp_fedavg" and c.dp_epsilon_budget > 0:
            done = self.registry.privacy().get(device, (0, 0.0))[0]
            if not within_budget(c.dp_noise_multiplier, done, c.dp_delta, c.dp_epsilon_budget):
                spent = epsilon(c.dp_noise_multiplier, done, c.dp_delta)
                raise PayloadError(
                    f"{device} has spent its privacy budget (epsilon {spent:.2f} of "
                    f"{c.dp_epsilon_budget}; one more round would exceed it)",
                    "privacy_budget",
                )
        return update

    def _route(self, msg: Message) -> str | None:
        """Record a status, answer a mixture, keep a reveal; returns the device of an update to
        check."""
        if msg.topic.startswith(self.topics.reveal("x")[:-1]):
            self._keep_reveal(msg)
            return None
        if self.coordinator is not None and msg.topic.startswith(self.topics.all_partials[:-1]):
            self.coordinator.keep(msg)
            return None
        try:
            device = self.topics.device_of(msg.topic)
        except ConfigError as err:
            log.warning("ignoring message on %s: %s", msg.topic, err)
            return None
        if msg.topic == self.topics.status(device):
            try:
                status = DeviceStatus.decode(msg.payload)
            except PayloadError as err:
                log.warning("ignoring a bad status from %s: %s", device, err)
                return None
            self.registry.seen(device, status.state)
            if self.secure is not None:
                self.secure.note_key(device, status.masking_key)
            self.metrics.count_devices(self.registry.device_states())
            if status.refused:
                log.warning("device %s refused a push: %s", device, status.refused)
                self.registry.log_refused_push(device, status.refused)
                self.metrics.refused_pushes.labels(device).inc()
            return None
        if msg.topic == self.topics.update(device):
            return device  # seen when its batch is committed
        self.registry.seen(device)
        if msg.topic == self.topics.mixture(device):
            self.handle_mixture(msg)
        return None

    def _recv(self, timeout: float) -> Message | None:
        """The next message: those a batch held back first."""
        if self._held:
            return self._held.pop(0)
        return self.transport.recv(timeout=timeout)

    def _receive(self, deadline: float) -> list[Message]:
        """What has arrived, up to ``BATCH`` messages or ``BATCH_BYTES`` (the first waits up to
        a second)."""
        first = self._recv(min(1.0, max(0.0, deadline - time.monotonic())))
        batch = [first] if first is not None else []
        size = len(first.payload) if first is not None else 0
        while batch and len(batch) < BATCH and size < BATCH_BYTES:
            msg = self._recv(0)
            if msg is None:
                break
            batch.append(msg)
            size += len(msg.payload)
        return batch

    def run_round(self, round_: int) -> RoundResult:
        result = RoundResult(round_)
        start = time.monotonic()
        self.registry.open_round(round_)
        cohort = self._cohort(round_, start) if self.secure is not None else None
        self.announce(round_, secagg=cohort)
        log.info(
            "round %d open: adapter v%d, waiting for %d updates (timeout %.0f s)",
            round_,
            self.version,
            self.config.quorum,
            self.config.round_timeout_s,
        )
        deadline = start + self.config.round_timeout_s
        if self.coordinator is not None:  # the workers collect (server/workers.py)
            merged = self.coordinator.gather(round_, result, deadline)
            if merged is not None:
                self._aggregate(round_, [], merged)
            return self._close_round(round_, result, start)
        # FedAvg as a running sum: each update is folded in as it is committed and its tensors
        # dropped (memory stays flat however many devices report); None: kept for the end
        total = Partial(round_, self.layout.size) if self.config.summable else None
        updates = self._reload(round_, result, total)
        sent: dict[str, int] = {}  # update messages per device this round (rate limit)
        seen = {u.device for u in updates}  # devices whose update this round took
        while len(updates) < self.config.quorum and time.monotonic() < deadline:
            batch, taken = self._receive(deadline), _Batch()
            for i, msg in enumerate(batch):
                if len(updates) + len(taken.accepted) >= self.config.quorum:
                    self._held[:0] = batch[i:]  # the next round's (or refused then)
                    batch = batch[:i]
                    break
                self._take(msg, round_, seen, taken, sent)
            self._commit(round_, taken, updates, result, total)
            for msg in batch:  # acknowledged only now: accepted updates are on disk first
                self.transport.ack(msg)
        if cohort is not None and updates:
            updates = self._open_secure_sum(round_, updates, deadline)
        merged = total.fold(self.current, self.layout, self.seeds.replay) if total else None
        if merged is not None:
            self._aggregate(round_, updates, merged)
        elif updates:
            self._aggregate(round_, updates)
        else:
            log.warning(
                "round %d closed with no usable update; the global adapter stays v%d",
                round_,
                self.version,
            )
        return self._close_round(round_, result, start)

    def _close_round(self, round_: int, result: RoundResult, start: float) -> RoundResult:
        result.version, result.seconds = self.version, time.monotonic() - start
        self.registry.close_round(round_, len(result.accepted), len(result.rejected), self.version)
        self.state.close_round(round_)
        self.metrics.rounds.inc()
        log.info(
            "round %d closed in %.0f s: %d accepted, %d rejected → adapter v%d",
            round_,
            result.seconds,
            len(result.accepted),
            len(result.rejected),
            self.version,
        )
        return result

    # -- secure aggregation (server/secure.py) ----------------------------------------------------
    def _cohort(self, round_: int, start: float) -> SecAggRound | None:
        """Wait (up to the round's timeout) for the quorum's masking keys, then name the
        cohort; ``None`` if fewer than two devices can take part."""
        assert self.secure is not None
        deadline = start + self.config.round_timeout_s
        want = max(2, self.config.quorum)
        while time.monotonic() < deadline:
            online = {d for d, (_, state) in self.registry.devices().items() if state == "online"}
            if len(set(self.secure.keys) & online) >= want:
                break
            self._idle(deadline)
        online = {d for d, (_, state) in self.registry.devices().items() if state == "online"}
        cohort = self.secure.open(round_, online)
        if cohort is None:
            log.warning("round %d: fewer than two devices with masking keys online", round_)
        return cohort

    def _idle(self, deadline: float) -> None:
        """Take one message outside the collection of updates: statuses, mixtures and reveals
        are handled; an update is refused (its round is not collecting)."""
        msg = self._recv(min(1.0, max(0.0, deadline - time.monotonic())))
        if msg is None:
            return
        try:
            device = self._route(msg)
            if device is not None:
                self.registry.seen(device)
                log.warning("ignored an update from %s outside a round's collection", device)
        finally:
            self.transport.ack(msg)

    def _keep_reveal(self, msg: Message) -> None:
        try:
            reveal = Reveal.decode(msg.payload)
            if msg.topic != self.topics.reveal(reveal.sender):
                raise PayloadError(f"a reveal from {reveal.sender} on {msg.topic}")
        except (PayloadError, ConfigError) as err:
            log.warning("ignoring a bad reveal on %s: %s", msg.topic, err)
            return
        self.reveals.setdefault(reveal.round, {})[reveal.sender] = reveal

    def _open_secure_sum(self, round_: int, updates: list[Update], deadline: float) -> list[Update]:
        """The round's masked uploads as one update: their mean, unmasked with the survivors'
        pair seeds when some members dropped (none if it cannot be opened)."""
        assert self.secure is not None
        masked = {u.device: u.masked for u in updates if u.masked is not None}
        dropped = self.secure.dropped(round_, list(masked))
        if dropped:
            log.info("round %d: %s masked but did not upload; asking the others", round_, dropped)
            self._publish_retained(
                self.topics.secagg_unmask, Unmask(round_, tuple(dropped)).encode()
            )
            wait = time.monotonic() + self.config.round_timeout_s
            while set(masked) - set(self.reveals.get(round_, {})) and time.monotonic() < wait:
                self._idle(wait)
        try:
            mean = self.secure.mean(round_, masked, self.reveals.pop(round_, {}))
        except (AggregationError, PayloadError) as err:
            log.error("round %d: %s; the global adapter stays v%d", round_, err, self.version)
            return []
        return [Update("secure-sum", len(masked), delta=self.layout.unflatten(mean))]

    def _take(
        self, msg: Message, round_: int, seen: set[str], batch: _Batch, sent: dict[str, int]
    ) -> None:
        """Route one message of an open round; an update is checked and joins ``batch``."""
        device = self._route(msg)
        if device is None:
            return
        sent[device] = sent.get(device, 0) + 1
        limit = self.config.max_messages_per_round
        if sent[device] > limit:
            if sent[device] == limit + 1:  # said once per device and round
                reason = f"over {limit} update messages in round {round_}: dropping the rest"
                log.warning("round %d: %s: %s", round_, device, reason)
                batch.refuse(device, len(msg.payload), reason)
            self.metrics.refused(len(msg.payload), "rate_limit")
            return
        try:
            update = self.check_update(msg, round_, seen)
        except FleetuneError as err:
            log.warning("round %d: rejected update from %s: %s", round_, device, err)
            batch.refuse(device, len(msg.payload), str(err))
            code = err.reason if isinstance(err, PayloadError) else "malformed"
            self.metrics.refused(len(msg.payload), code)
            return
        seen.add(device)  # a second update from it this round is a duplicate
        batch.accepted.append((msg, update))
        batch.rows.append((device, len(msg.payload), update.num_examples, True, ""))

    def _sum(self, round_: int, updates: list[Update], total: Partial | None) -> list[Update]:
        """``updates`` added to the running sum ``total`` (discounted by staleness), returned
        without their tensors; as they are when there is no running sum."""
        if total is None:
            return updates
        exponent, cap = self.config.staleness_exponent, self.config.max_examples
        for update in updates:
            fresh = discount(update, round_, exponent, self.seeds.replay)
            total.add(fresh, running_weight(update.num_examples, cap), self.layout)
        return [replace(u, delta=None, seeds=None) for u in updates]

    def _commit(
        self,
        round_: int,
        batch: _Batch,
        updates: list[Update],
        result: RoundResult,
        total: Partial | None = None,
    ) -> None:
        """A batch's accepted updates synced to disk in one file (the updates, or the round's
        running sum when that is smaller) and its registry rows in one transaction (a group
        commit); only then do they count."""
        kept = self._sum(round_, [u for _, u in batch.accepted], total)
        payloads = [(u.device, m.payload) for m, u in batch.accepted]
        if total is not None and sum(len(p) for _, p in payloads) > total.total.nbytes:
            self.state.save_sum(round_, total.encode("server"))  # fewer bytes to sync
        elif payloads:
            self.state.save_accepted(round_, payloads)
        perplexities = [
            (u.device, ppl)
            for _, u in batch.accepted
            if (ppl := reported_perplexity(u.metrics)) is not None  # the dashboard's plot
        ]
        if batch.rows:
            self.registry.log_batch(round_, batch.rows, perplexities)
        result.rejected += [(d, why) for d, _, _, ok, why in batch.rows if not ok]
        for (msg, update), light in zip(batch.accepted, kept, strict=True):
            updates.append(light)
            result.accepted.append(update.device)
            self.metrics.accepted(len(msg.payload), update.device, update.metrics)
            self.metrics.staleness.observe(update.staleness)
            log.info(
                "round %d: update %d/%d from %s (%d bytes, %d examples, %d versions behind; "
                "it serves %s)",
                round_,
                len(updates),
                self.config.quorum,
                update.device,
                len(msg.payload),
                update.num_examples,
                update.staleness,
                update.metrics.get("served", "?"),
            )

    def _reload(self, round_: int, result: RoundResult, total: Partial | None) -> list[Update]:
        """The updates this round accepted before a crash (none for a new round): a saved
        running sum goes into ``total``, saved updates after it are checked again."""
        summed, saved = self.state.accepted(round_)
        light: list[Update] = []
        if summed is not None:
            if total is None:
                raise ConfigError(
                    f"round {round_} was saved as a running FedAvg sum; resume it with "
                    'strategy = "fedavg" (no norm_bound, clusters, basis or secagg)'
                )
            _, before = Partial.decode(summed, self.layout.size)
            total.merge(before)
            light = [Update(device, 0) for device in before.devices]
            result.accepted += before.devices
        updates: list[Update] = []
        for device, payload in saved:
            try:
                updates.append(self.check_update(Message("", payload), round_, set(), device))
            except FleetuneError as err:  # written by another version of the state: say so
                log.warning(
                    "round %d: a saved update from %s no longer holds: %s", round_, device, err
                )
                continue
            result.accepted.append(device)
        if updates or light:
            log.info("round %d resumed with %d accepted updates", round_, len(light + updates))
        return light + self._sum(round_, updates, total)

    def _aggregate(
        self, round_: int, updates: list[Update], merged: Aggregate | None = None
    ) -> None:
        """The next adapter (``merged``: the workers' fold, else the strategy's), written to
        state only once its downlink encoding is known to work: an aggregate that cannot be
        pushed (say, beyond f16's range) leaves the fleet on the current version instead of a
        state directory that cannot start again."""
        before = self.current
        timer = time.monotonic()
        exponent = self.config.staleness_exponent
        updates = [discount(u, round_, exponent, self.seeds.replay) for u in updates]
        try:
            if merged is None:
                merged = self.strategy.aggregate(
                    self.current, updates, lambda seeds: self.seeds.replay(seeds, round_)
                )
            pushed = GlobalAdapter(self.version + 1, merged.tensors, round_)
            payload = pushed.encode(self.fleet, self.config.downlink_encoding)
        except (AggregationError, PayloadError) as err:
            log.error("round %d: no new adapter (%s); staying on v%d", round_, err, self.version)
            return
        self.current, self.version = merged.tensors, pushed.version
        if self.config.strategy == "dp_fedavg":
            self.account(u.device for u in updates)
        self.metrics.aggregation.observe(time.monotonic() - timer)
        self.metrics.adapter_version.set(self.version)
        self.state.save_adapter(self.version, self.current, round_)
        self._publish_retained(self.topics.global_adapter, payload)
        if merged.seeds is not None:
            self.publish_seeds(round_, merged.seeds, len(payload))
        if self.config.clusters:
            self.push_clusters(round_, before, updates)
        if self.config.basis_k:
            self.mixtures.remember(
                updates, before, round_, lambda seeds: self.seeds.replay(seeds, round_)
            )
            self.mixtures.refresh_basis(round_)

    def account(self, devices: Iterable[str]) -> None:
        """One more Gaussian release for each device in a DP round, and for the fleet: the
        epsilon spent, in the registry and the metrics (``edge_sdk/privacy.py``)."""
        sigma, delta = self.config.dp_noise_multiplier, self.config.dp_delta
        spent = self.registry.privacy()
        for who in (*devices, FLEET):
            releases = spent.get(who, (0, 0.0))[0] + 1
            eps = epsilon(sigma, releases, delta)
            self.registry.record_privacy(who, releases, eps, delta)
            self.metrics.epsilon.labels("fleet" if who == FLEET else who).set(eps)
        log.info("privacy: the fleet has spent epsilon %.2f (delta %g)", eps, delta)

    def push_clusters(self, round_: int, before: Tensors, updates: list[Update]) -> int:
        """Each device of the round gets its cluster's adapter (server/clusters.py), moved by
        the round's updates; the clusters are saved for a restart. With ``cluster_assign =
        "loss"`` devices join the cluster their canary scored best, and every cluster adapter
        goes out on ``adapter/cluster/{c}`` for the next round's scoring."""
        loss = self.config.cluster_assign == "loss"
        picks = self.clusters.picks_by_loss(updates) if loss else None
        personal = self.clusters.advance(
            before,
            updates,
            lambda seeds: self.seeds.replay(seeds, round_),
            seed=round_,
            assign=picks,
        )
        self.state.save_clusters(self.clusters.state())
        groups = sorted({c for c, _ in personal.values()})
        # one message per cluster: a device's push is its cluster's adapter, the same bytes
        needed = self.clusters.models if loss else groups
        models = {c: self.clusters.models[c] for c in needed}
        encoded = encode_personal(models, self.fleet, self.config.downlink_encoding, self.version)
        for device, (c, _) in personal.items():
            # a cluster the downlink cannot carry is left out: its devices keep the global
            if c in encoded:
                self._publish_retained(self.topics.personal(device), encoded[c])
        if loss:
            for c, payload in encoded.items():
                self._publish_retained(self.topics.cluster(c), payload)
        log.info(
            "round %d: %d devices in %d clusters (%d assigned by validation loss)",
            round_,
            len(personal),
            len(groups),
            len(picks or {}),
        )
        return len(personal)

    def run(self) -> list[RoundResult]:
        """Run the configured rounds, then announce the end with the final adapter."""
        self.connect()
        if self.coordinator is not None:
            self.coordinator.take_lead()
        self.publish_keys()
        self.publish_global(self.first_round - 1)
        results = []
        last = self.first_round + self.config.rounds - 1
        for round_ in range(self.first_round, last + 1):
            results.append(self.run_round(round_))
        self.announce(last, done=True)
        log.info("done after round %d: final adapter v%d", last, self.version)
        if self.config.mix_quorum:
            self.serve_mixtures(self.config.mix_quorum, self.config.round_timeout_s)
        return results

    def snapshot(self) -> dict:
        """The fleet as the dashboard shows it (``/api/fleet``)."""
        reg, columns = self.registry, ("round", "started", "closed", "accepted", "rejected")
        return {
            "fleet": self.config.fleet,
            "mode": self.config.mode,
            "adapter_version": self.version,
            "devices": {d: {"last_seen": t, "state": s} for d, (t, s) in reg.devices().items()},
            "rounds": [
                {**dict(zip(columns, row[:5], strict=True)), "adapter_version": row[5]}
                for row in reg.rounds()
            ],
            "perplexity": {d: [list(p) for p in ps] for d, ps in reg.perplexities().items()},
            "refusals": [
                {"round": r, "device": d, "reason": why} for r, d, why in reg.rejections(last=50)
            ],
            "refused_total": reg.refused_count(),
        }

    # -- mixture personalization ------------------------------------------------------------------
    @property
    def members(self) -> dict[str, np.ndarray]:
        return self.mixtures.members

    @property
    def mixtures_served(self) -> int:
        return len(self.mixtures.served)

    def handle_mixture(self, msg: Message) -> bool:
        return self.mixtures.handle(msg, self.version)

    def serve_mixtures(self, count: int, timeout_s: float) -> int:
        """Answer mixture uploads until ``count`` were served or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        log.info("serving mixtures: waiting for %d devices (timeout %.0f s)", count, timeout_s)
        while self.mixtures_served < count and time.monotonic() < deadline:
            msg = self._recv(min(1.0, max(0.0, deadline - time.monotonic())))
            if msg is not None:
                try:
                    self._route(msg)
                finally:
                    self.transport.ack(msg)
        return self.mixtures_served

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self.blobs is not None:
            self.blobs.close()
        if self.dashboard is not None:
            self.dashboard.close()
        if self.coordinator is not None:
            self.coordinator.resign()
        self.state.close()
