"""EdgeClient: open the engine on a bundle → follow the server's rounds (or personalize from the
fleet's basis) → tune locally → upload through the on-disk outbox → repeat.

The round loop lives in :mod:`~fleetune.edge_sdk.rounds`, the mixture session in
:mod:`~fleetune.edge_sdk.personal`, the tuners behind one interface in
:mod:`~fleetune.edge_sdk.tuners`; this module owns the device's lifecycle and its connections.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.backends import Backend, load_backend
from fleetune.edge_sdk.bundle import Bundle, cache_dir, open_bundle
from fleetune.edge_sdk.config import FleetuneConfig
from fleetune.edge_sdk.data import ClientData, ClientText, prepare_client
from fleetune.edge_sdk.errors import ConfigError, FleetuneError, PayloadError, TransportError
from fleetune.edge_sdk.evaluation import DeviceReport, perplexity
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.protocol import DeviceStatus, Fleet, PersonalAdapter
from fleetune.edge_sdk.secagg import MaskingKey
from fleetune.edge_sdk.signing import Keyring, parse_key, unwrap
from fleetune.edge_sdk.store import DeviceStore
from fleetune.edge_sdk.transport.base import Message, Transport
from fleetune.edge_sdk.transport.chunks import ChunkedTransport
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.edge_sdk.tuners.base import LocalTuner, Progress, Tensors, make_tuner

log = logging.getLogger(__name__)
MAX_REPORTS = 20  # refused pushes a device reports upstream per run
RETRY_S = 5.0  # how often a device with queued messages tries the broker again
__all__ = ["DeviceReport", "EdgeClient"]


class EdgeClient:
    """One device of a fleet. Use as a context manager; see :meth:`run`.

    The engine opens the device bundle its config names (``[device] bundle``, else the default
    location for its base and engine). ``base`` is for the torch reference engine, which runs a
    Hugging Face copy; ``transport`` replaces the MQTT connection (tests, other transports),
    ``store`` the on-disk outbox in ``[device] state_dir``."""

    def __init__(
        self,
        config: FleetuneConfig,
        base: BaseManifest | None = None,
        transport: Transport | None = None,
        bundle: Bundle | None = None,
        store: DeviceStore | None = None,
    ) -> None:
        self.config = config
        self.device = config.device.id
        self.topics = Topics(config.sync.fleet)
        t = config.tuning
        self.spec = LoraSpec(  # lora_window = -1: fitted to the memory budget below
            r=t.lora_r, alpha=t.lora_alpha, targets=t.lora_targets, window=max(t.lora_window, 0)
        )
        self._base = base
        self._bundle = bundle
        self._transport = self._chunked(transport) if transport is not None else None
        self._backend: Backend | None = None
        self._store = store
        self._layout: FlatLayout | None = None
        self._tuner: LocalTuner | None = None
        self._keyring: Keyring | None = None
        self.tuned_adapter: Tensors | None = None  # the last round's tuned adapter
        self.cluster_adapter: Tensors | None = None  # the last cluster adapter pushed to it
        self.cluster_adapters: dict[int, PersonalAdapter] = {}  # adapter/cluster/{c}, latest
        self.refusals = 0  # pushes this device refused (bad signature, malformed, other base)
        self._cache_ram_mb = math.inf  # RAM a window's prefix cache may take (memory budget)
        if config.device.memory_budget_mb:
            self._fit_budget()

    def _fit_budget(self) -> None:
        """Batch and window length fitted to ``[device] memory_budget_mb`` (edge_sdk/memory.py);
        a ConfigError naming what would fit when nothing does."""
        from dataclasses import replace

        from fleetune.edge_sdk.memory import fit_budget

        dev, t = self.config.device, self.config.tuning
        plan = fit_budget(
            dev.memory_budget_mb,
            self.base,
            dev.backend,
            dev.precision,
            t.tuner,
            t.lora_window,
            t.batch_size,
            t.seq_len,
        )
        if t.lora_window == -1:
            log.info(
                "%s: memory_budget_mb = %g fits a window of the top %d layers, ~%.0f MB",
                self.device,
                dev.memory_budget_mb,
                plan.window,
                plan.estimate_mb,
            )
            self.spec = replace(self.spec, window=plan.window)
        elif (plan.batch_size, plan.seq_len) != (t.batch_size, t.seq_len):
            log.info(
                "%s: memory_budget_mb = %g fits batch %d x %d (configured %d x %d), ~%.0f MB",
                self.device,
                dev.memory_budget_mb,
                plan.batch_size,
                plan.seq_len,
                t.batch_size,
                t.seq_len,
                plan.estimate_mb,
            )
        tuning = replace(
            t, batch_size=plan.batch_size, seq_len=plan.seq_len, lora_window=self.spec.window
        )
        self.config = replace(self.config, tuning=tuning)
        self._cache_ram_mb = dev.memory_budget_mb - plan.estimate_mb  # a window's prefix cache

    # -- what the device runs ---------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle | None:
        """The device bundle; ``None`` for the torch engine given a Hugging Face ``base``."""
        dev = self.config.device
        if self._bundle is None and not (dev.backend == "torch" and self._base is not None):
            self._bundle = open_bundle(dev.backend, dev.base, self.spec, dev.precision, dev.bundle)
        return self._bundle

    @property
    def base(self) -> BaseManifest:
        if self._base is None:
            bundle = self.bundle
            if bundle is None:  # pragma: no cover - bundle is None only when _base is set
                raise ConfigError("no base model: give the client a bundle or a base")
            self._base = bundle.base
        return self._base

    @property
    def fleet(self) -> Fleet:
        """The base and adapter spec every message is validated against."""
        return Fleet(self.base, self.spec)

    @property
    def layout(self) -> FlatLayout:
        """The adapter as one flat vector (what zeroth-order steps move)."""
        if self._layout is None:
            self._layout = FlatLayout(self.spec, self.base)
        return self._layout

    @property
    def tuner(self) -> LocalTuner:
        if self._tuner is None:
            self._tuner = make_tuner(self.config.tuning, self.layout)
            if self.config.device.memory_budget_mb:  # a larger prefix cache goes to disk
                self._tuner.cache_ram_mb = self._cache_ram_mb
                self._tuner.cache_dir = self.store.root / "prefix"
        return self._tuner

    @property
    def keyring(self) -> Keyring | None:
        """The fleet keys this device trusts (``[sync] fleet_key`` and the rotations it saw
        since); ``None`` when it pinned none and takes pushes unverified."""
        if self._keyring is None and self.config.sync.fleet_key:
            self._keyring = Keyring([parse_key(self.config.sync.fleet_key)])
            saved = self._store.load_keys() if self._store is not None else None
            if saved is not None:
                try:
                    self._keyring.rotate(saved)
                except PayloadError as err:
                    log.warning("%s: ignoring the saved key list: %s", self.device, err)
        return self._keyring

    def receive(self, msg: Message) -> bytes | None:
        """The message inside a push from the server, verified when the device holds the fleet's
        keys (``PayloadError`` otherwise); ``None`` for a key list, which is handled here."""
        if msg.topic == self.topics.keys:
            keyring = self.keyring
            if keyring is not None and keyring.rotate(msg.payload):
                self.store.save_keys(msg.payload)
                log.info("%s: fleet keys rotated to version %d", self.device, keyring.version)
            return None
        return unwrap(msg.payload, self.keyring, msg.topic.rsplit("/", 2)[-1])

    def refuse(self, msg: Message, err: FleetuneError) -> None:
        """Log a push that failed its checks and report it upstream on the device's status
        (the first ``MAX_REPORTS``: a flood of bad pushes must not become a flood of reports)."""
        self.refusals += 1
        log.error("%s: refused a push on %s: %s", self.device, msg.topic, err)
        if self.refusals > MAX_REPORTS or self._transport is None:
            return
        status = DeviceStatus("online", f"{msg.topic}: {err}", self.masking_key.public.hex())
        try:
            self._transport.publish(self.topics.status(self.device), status.encode(), retain=True)
        except TransportError as failed:
            log.warning("%s: could not report the refusal: %s", self.device, failed)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise FleetuneError("the EdgeClient is not open: use `with EdgeClient(...)` or open()")
        return self._backend

    @property
    def masking_key(self) -> MaskingKey:
        """The device's key for secure aggregation's pair masks (kept in its state folder)."""
        return MaskingKey.from_bytes(self.store.masking_key())

    @property
    def store(self) -> DeviceStore:
        if self._store is None:
            raise FleetuneError("the EdgeClient is not open: use `with EdgeClient(...)` or open()")
        return self._store

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise TransportError("the EdgeClient is not connected")
        return self._transport

    # -- lifecycle --------------------------------------------------------------------------------
    def open(self) -> EdgeClient:
        dev = self.config.device
        if self._store is None:
            default = cache_dir() / "devices" / self.config.sync.fleet / self.device
            self._store = DeviceStore(Path(dev.state_dir or default))
        self._backend = load_backend(
            dev.backend,
            self.spec,
            bundle=self.bundle,
            base=self.base,
            threads=dev.threads,
            precision=dev.precision,
            recompute=dev.memory_budget_mb > 0,  # a bounded device trades a forward for memory
        )
        return self

    def __enter__(self) -> EdgeClient:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            try:
                self._transport.publish(
                    self.topics.status(self.device),
                    DeviceStatus("offline").encode(),
                    retain=True,
                    timeout=5,
                )
            except FleetuneError as err:
                log.warning("%s: could not publish offline status: %s", self.device, err)
            self._transport.close()
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._tuner is not None:
            self._tuner.close()

    def _chunked(self, transport: Transport) -> ChunkedTransport:
        """Whatever carries the messages, payloads above the limit go in chunks."""
        sync = self.config.sync
        return ChunkedTransport(transport, sync.max_message_bytes, blob_url=sync.blob_url)

    def connect(self) -> Transport:
        if self._transport is None:
            from fleetune.edge_sdk.transport.mqtt import MqttTransport

            sync = self.config.sync
            will = (self.topics.status(self.device), DeviceStatus("offline").encode())
            self._transport = self._chunked(
                MqttTransport(
                    sync.host,
                    sync.port,
                    f"{sync.fleet}-{self.device}",
                    protocol=sync.protocol,
                    will=will,
                    tls=sync.tls(),
                )
            )
        transport = self._transport
        transport.subscribe(self.topics.keys)
        transport.subscribe(self.topics.round)
        transport.connect()
        online = DeviceStatus("online", masking_key=self.masking_key.public.hex())
        try:
            transport.publish(self.topics.status(self.device), online.encode(), retain=True)
        except TransportError as err:  # informational: the round's messages retry on their own
            log.warning("%s: could not publish online status: %s", self.device, err)
        return transport

    def flush_outbox(self) -> int:
        """Send queued messages; each is removed only after the broker acknowledged it."""
        sent = 0
        for path, topic, payload in self.store.pending():
            self.transport.publish(topic, payload)
            self.store.done(path)
            sent += len(payload)
        return sent

    def deliver(self) -> int:
        """:meth:`flush_outbox`, but a broker that is down (or refusing) is not the device's
        end: what is queued stays in the outbox for the next try."""
        try:
            return self.flush_outbox()
        except TransportError as err:
            left = self.store.queued()
            log.warning("%s: %d messages wait in the outbox: %s", self.device, left, err)
            return 0

    def next_push(self, wait: float, report: DeviceReport) -> Message | None:
        """The next message from the broker within ``wait`` seconds (``None`` after that).
        Meanwhile what waits in the outbox is tried again every ``RETRY_S``."""
        deadline = time.monotonic() + wait
        while True:
            queued = self.store.queued() > 0
            if queued:
                report.bytes_up += self.deliver()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self.transport.recv(timeout=min(RETRY_S, left) if queued else left)
            if msg is not None:
                return msg

    # -- local work -------------------------------------------------------------------------------
    def prepare(self, item: ClientText) -> ClientData:
        t = self.config.tuning
        return prepare_client(
            item, self.backend.tokenize, seq_len=t.seq_len, max_eval_windows=t.max_eval_windows
        )

    def evaluate(self, windows: np.ndarray) -> float:
        """Perplexity of the current adapter on ``windows``."""
        return perplexity(self.backend, windows, self.config.tuning.batch_size)

    def progress(self, round_: int) -> Progress:
        steps = self.config.tuning.steps

        def report(step: int, loss: float) -> None:
            if step == steps or step % max(1, steps // 4) == 0:
                log.info(
                    "%s round %d: step %d/%d loss %.3f", self.device, round_, step, steps, loss
                )

        return report

    def run(self, item: ClientText, data: ClientData | None = None) -> DeviceReport:
        """Take part in rounds until the server announces the end, or (tuner ``mix``)
        personalize once from the fleet's basis; return what was measured."""
        from fleetune.edge_sdk.personal import personalize
        from fleetune.edge_sdk.rounds import follow_rounds

        data = data or self.prepare(item)
        if self.config.tuning.tuner == "mix":
            return personalize(self, item, data)
        return follow_rounds(self, item, data)
