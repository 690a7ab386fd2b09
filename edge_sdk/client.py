"""EdgeClient: load the engine → wait for a round → tune locally → encode → sync → repeat.

A device follows the server's retained round announcements. For each round it loads the global
adapter the announcement names, scores it on held-out text, tunes it on local text, and uploads the
delta (compressed) through its on-disk outbox, which survives broker outages and reboots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from edge_sdk import codec
from edge_sdk.adapters.lora import LoraSpec, init_lora
from edge_sdk.adapters.lora.flat import FlatLayout
from edge_sdk.adapters.lora.io import check_envelope, check_layout
from edge_sdk.backends import Backend
from edge_sdk.config import ZO_PARAMS, FleetuneConfig
from edge_sdk.data import ClientData, ClientText, prepare_client
from edge_sdk.errors import ConfigError, FleetuneError, PayloadError, TransportError
from edge_sdk.manifest import BaseManifest
from edge_sdk.store import DeviceStore
from edge_sdk.transport.base import Transport
from edge_sdk.transport.topics import Topics
from edge_sdk.tuners.mix import (
    Basis,
    Mixer,
    engine_loss,
    mixture_envelope,
    read_prior,
    split_validation,
    tune_mix,
)
from edge_sdk.tuners.zo import Z_VERSION, replay, zo_tune

Tensors = dict[str, np.ndarray]

log = logging.getLogger(__name__)


@dataclass
class DeviceReport:
    """What a device measured over a run; JSON-friendly."""

    device: str
    client: str
    ppl_base: float = math.nan
    ppl_local: float = math.nan  # after local tuning in the last round
    ppl_final: float = math.nan  # under the final global adapter
    bytes_up: int = 0
    bytes_down: int = 0
    history: list[dict] = field(default_factory=list)  # per round: ppl_global, ppl_local


@dataclass
class _Global:
    version: int
    tensors: dict[str, np.ndarray]


class EdgeClient:
    """One device of a fleet. Use as a context manager; see :meth:`run`."""

    def __init__(
        self,
        config: FleetuneConfig,
        base: BaseManifest | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.device = config.device.id
        self.topics = Topics(config.sync.fleet)
        t = config.tuning
        self.spec = LoraSpec(r=t.lora_r, alpha=t.lora_alpha, targets=t.lora_targets)
        self._base = base
        self._transport = transport
        self._backend: Backend | None = None
        self._store: DeviceStore | None = None
        self._layout: FlatLayout | None = None
        self.tuned_adapter: Tensors | None = None  # the last zeroth-order round's result

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def base(self) -> BaseManifest:
        if self._base is None:
            from models.base import prepare_base

            self._base = prepare_base(self.config.device.base)
        return self._base

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise FleetuneError("the EdgeClient is not open: use `with EdgeClient(...)` or open()")
        return self._backend

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

    @property
    def layout(self) -> FlatLayout:
        """The adapter as one flat vector (what zeroth-order steps move)."""
        if self._layout is None:
            self._layout = FlatLayout(self.spec, self.base)
        return self._layout

    def open(self) -> EdgeClient:
        from edge_sdk.backends import load_backend

        state = self.config.device.state_dir
        if not state:
            from models.base import cache_dir

            state = str(cache_dir() / "devices" / self.config.sync.fleet / self.device)
        self._store = DeviceStore(state)
        dev = self.config.device
        self._backend = load_backend(
            dev.backend,
            self.base,
            self.spec,
            threads=dev.threads,
            artifacts=dev.artifacts,
            precision=dev.precision,
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
                    json.dumps({"state": "offline"}).encode(),
                    retain=True,
                    timeout=5,
                )
            except FleetuneError as err:
                log.warning("%s: could not publish offline status: %s", self.device, err)
            self._transport.close()
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def connect(self) -> Transport:
        if self._transport is None:
            from edge_sdk.transport.mqtt import MqttTransport

            sync = self.config.sync
            will = (self.topics.status(self.device), json.dumps({"state": "offline"}).encode())
            self._transport = MqttTransport(
                sync.host,
                sync.port,
                f"{sync.fleet}-{self.device}",
                protocol=sync.protocol,
                will=will,
            )
        transport = self._transport
        transport.subscribe(self.topics.round)
        transport.connect()
        transport.publish(
            self.topics.status(self.device), json.dumps({"state": "online"}).encode(), retain=True
        )
        return transport

    # -- local work -----------------------------------------------------------------------------
    def prepare(self, item: ClientText) -> ClientData:
        t = self.config.tuning
        return prepare_client(
            item, self.backend.tokenize, seq_len=t.seq_len, max_eval_windows=t.max_eval_windows
        )

    def evaluate(self, windows: np.ndarray) -> float:
        """Perplexity of the current adapter on ``windows`` (token-weighted mean loss)."""
        bs = self.config.tuning.batch_size
        losses = [
            self.backend.loss(windows[i : i + bs]) * len(windows[i : i + bs])
            for i in range(0, len(windows), bs)
        ]
        return float(math.exp(sum(losses) / len(windows)))

    def _progress(self, round_: int):
        steps = self.config.tuning.steps

        def report(step: int, loss: float) -> None:
            if step == steps or step % max(1, steps // 4) == 0:
                log.info(
                    "%s round %d: step %d/%d loss %.3f", self.device, round_, step, steps, loss
                )

        return report

    def tune(self, data: ClientData, round_: int) -> dict:
        """Backprop on the current adapter (torch backend)."""
        from edge_sdk.tuners.backprop import tune_backprop

        t = self.config.tuning
        seed = zlib.crc32(f"{t.seed}/{self.device}/{round_}".encode())
        return tune_backprop(
            self.backend,
            data.train,
            t.steps,
            t.lr,
            t.batch_size,
            seed,
            self._progress(round_),
            params=t.backprop_params,
        )

    def tune_zo(
        self, data: ClientData, round_: int, current: Tensors, pool: dict
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Zeroth-order steps from ``current`` with seeds of the round's pool. Returns the seed
        indices, their coefficients, and metrics; the backend holds the replayed result."""
        t = self.config.tuning
        if pool.get("z_version", Z_VERSION) != Z_VERSION:
            raise ConfigError(
                f"the server draws perturbations by z version {pool['z_version']}, this device "
                f"by {Z_VERSION}: update fleetune on one side"
            )
        params = pool.get("params", t.zo_params)
        zo = t.zo(pool_seed=int(pool["pool_seed"]), pool_size=int(pool["pool_size"]))
        rng = np.random.default_rng(zlib.crc32(f"{t.seed}/{self.device}/{round_}".encode()))
        batches = [
            data.train[
                rng.choice(len(data.train), size=min(t.batch_size, len(data.train)), replace=False)
            ]
            for _ in range(t.steps)
        ]

        def loss(theta: np.ndarray, step: int) -> float:
            return self.backend.loss_flat(batches[step], theta)

        theta = self.layout.flatten(current)
        tuned = self.layout.indices(params)
        pairs, metrics = zo_tune(loss, theta, tuned, t.steps, zo, rng, self._progress(round_))
        # the device keeps exactly what the server will rebuild from the seeds
        theta = self.layout.flatten(current)
        theta[tuned] += replay(pairs, zo.pool_seed, tuned.size)
        self.tuned_adapter = self.layout.unflatten(theta)
        self.backend.set_adapter(self.tuned_adapter)
        index = np.array([i for i, _ in pairs], dtype=np.int32)
        coef = np.array([c for _, c in pairs], dtype=np.float32)
        return (
            index,
            coef,
            {
                **metrics,
                "pool_seed": zo.pool_seed,
                "params": params,
                "z_version": Z_VERSION,
            },
        )

    def personalize(self, data: ClientData, basis: Basis) -> tuple[np.ndarray, Tensors, dict]:
        """Search mixing coefficients over the fleet's ``basis`` inside the engine, stopping early
        on validation windows kept out of training; the backend ends up running the best mix.
        Returns the coefficients [K, G], the mixed adapter and metrics."""
        t = self.config.tuning
        basis.check(self.spec, self.base)
        mixer = Mixer(basis, self.base, groups=t.mix_groups)
        train, val = split_validation(data.train)
        loss = engine_loss(self.backend, mixer)
        rng = np.random.default_rng(zlib.crc32(f"{t.seed}/{self.device}/mix".encode()))
        bs = t.batch_size
        # the objective: one fixed batch of training windows (see edge_sdk.tuners.mix)
        fixed = train[rng.choice(len(train), size=min(bs, len(train)), replace=False)]

        def validate(coef: np.ndarray) -> float:
            parts = [
                (loss(val[i : i + bs], coef), len(val[i : i + bs])) for i in range(0, len(val), bs)
            ]
            return sum(v * n for v, n in parts) / len(val)

        def progress(step: int, value: float) -> None:
            log.info(
                "%s mixture: step %d/%d validation loss %.3f", self.device, step, t.steps, value
            )

        coef, metrics = tune_mix(
            lambda c, step: loss(fixed, c),
            validate,
            basis.start(t.mix_groups),
            t.mix(),
            rng,
            progress,
        )
        theta = mixer.flat(coef)
        if t.mix_zo_steps:
            theta = self._warm_zo(theta, train, val, basis, metrics, rng)
        adapter = self.layout.unflatten(theta)
        self.backend.set_adapter(adapter)
        return coef, adapter, metrics

    def _warm_zo(
        self,
        start: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        basis: Basis,
        metrics: dict,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Plain B-only ZO from the mixed adapter. Kept only if validation improves; its seeds
        go into ``metrics["zo"]`` so the server rebuilds the same adapter."""
        t = self.config.tuning
        zo = t.zo(pool_seed=zlib.crc32(f"{self.device}/mix/{basis.version}".encode()))
        tuned = self.layout.indices("lora_b")
        bs = min(t.batch_size, len(train))
        batches = [
            train[rng.choice(len(train), size=bs, replace=False)] for _ in range(t.mix_zo_steps)
        ]
        theta = start.copy()
        pairs, _ = zo_tune(
            lambda th, step: self.backend.loss_flat(batches[step], th),
            theta,
            tuned,
            t.mix_zo_steps,
            zo,
            rng,
        )
        theta = start.copy()
        theta[tuned] += replay(pairs, zo.pool_seed, tuned.size)
        after = self.backend.loss_flat(val, theta)
        log.info(
            "%s: %d ZO steps after the mixture: validation loss %.3f → %.3f",
            self.device,
            t.mix_zo_steps,
            metrics["val_loss"],
            after,
        )
        if after >= metrics["val_loss"]:
            return start
        metrics["val_loss"] = after
        metrics["zo"] = {
            "pool_seed": zo.pool_seed,
            "pool_size": zo.pool_size,
            "pairs": [[i, c] for i, c in pairs],
        }
        return theta

    def run_mix(self, item: ClientText, data: ClientData | None = None) -> DeviceReport:
        """Personalize from the fleet's basis: take the retained basis, search coefficients,
        upload them (K x G floats), and run the personalized adapter the server pushes back.
        Without an answer the device keeps running its own mix (saved before the upload)."""
        data = data or self.prepare(item)
        report = DeviceReport(self.device, item.client)
        self.backend.set_adapter(init_lora(self.spec, self.base))
        report.ppl_base = self.evaluate(data.heldout)
        transport = self.connect()
        report.bytes_up += self.flush_outbox()
        transport.subscribe(self.topics.basis_prior)  # first: its retained copy comes first
        transport.subscribe(self.topics.basis)
        transport.subscribe(self.topics.personal(self.device))
        priors: dict[int, np.ndarray] = {}  # basis version -> the coefficients to start from
        basis: Basis | None = None
        coef: np.ndarray | None = None
        upload = ""  # sha256 of this device's mixture upload: the server's answer names it
        wait = self.config.sync.round_wait_s
        while True:
            msg = transport.recv(timeout=wait)
            if msg is None and basis is None:
                raise TransportError(f"{self.device}: no basis from the server for {wait:.0f} s")
            if msg is None:
                log.warning(
                    "%s: no answer from the server for %.0f s: keeping the local mix "
                    "(perplexity %.1f)",
                    self.device,
                    wait,
                    report.ppl_local,
                )
                report.ppl_final = report.ppl_local
                return report
            report.bytes_down += len(msg.payload)
            try:
                if msg.topic == self.topics.basis_prior:
                    version, prior = read_prior(msg.payload)
                    priors[version] = prior
                elif msg.topic == self.topics.basis and basis is None:
                    offered = Basis.decode(msg.payload)
                    if offered.version in priors:
                        offered = replace(offered, prior=priors[offered.version])
                    offered.check(self.spec, self.base)
                    basis = offered
                elif msg.topic == self.topics.personal(self.device) and basis is not None:
                    header, tensors = codec.decode(msg.payload)
                    check_envelope(header, "adapter", self.spec, self.base)
                    if header.metrics.get("mixture_sha256") != upload:
                        continue  # the answer to an earlier upload (retained)
                    check_layout(tensors, self.spec, self.base)
                    self.backend.set_adapter(tensors)
                    self.store.save_adapter(msg.payload)
                    report.ppl_final = self.evaluate(data.heldout)
                    report.history.append({"round": 1, "ppl_global": report.ppl_final})
                    log.info(
                        "%s: personalized adapter from basis v%d (coefficients %s): perplexity "
                        "%.1f → %.1f",
                        self.device,
                        basis.version,
                        np.round(np.asarray(coef).reshape(-1), 2).tolist(),
                        report.ppl_base,
                        report.ppl_final,
                    )
                    return report
                else:
                    continue
            except PayloadError as err:
                log.error("%s: ignoring a bad message on %s: %s", self.device, msg.topic, err)
                continue
            if basis is not None and coef is None:  # search, outside the message checks
                coef, upload = self._mix_and_upload(data, basis, report)

    def _mix_and_upload(
        self, data: ClientData, basis: Basis, report: DeviceReport
    ) -> tuple[np.ndarray, str]:
        """Search, keep the mix on disk, queue the coefficients; returns them and the upload's
        sha256."""
        coef, adapter, metrics = self.personalize(data, basis)
        report.ppl_local = self.evaluate(data.heldout)
        log.info(
            "%s: mixture of %d adapters after %d steps: perplexity %.1f → %.1f",
            self.device,
            basis.k,
            metrics["steps"],
            report.ppl_base,
            report.ppl_local,
        )
        local = codec.Header(
            kind="adapter",
            sender=self.device,
            round=0,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding="f32",
            metrics={"basis_version": basis.version, "local_mix": True},
        )
        self.store.save_adapter(codec.encode(local, adapter))
        summary = {
            "heldout_loss": math.log(report.ppl_local),
            "val_loss": metrics["val_loss"],
            "val_loss_start": metrics["val_loss_start"],
            "steps": metrics["steps"],
            **({"zo": metrics["zo"]} if "zo" in metrics else {}),
        }
        payload = mixture_envelope(self.device, basis, coef, len(data.train), summary)
        self.store.put(self.topics.mixture(self.device), payload)
        report.bytes_up += self.flush_outbox()
        return coef, hashlib.sha256(payload).hexdigest()

    # -- the round loop ---------------------------------------------------------------------------
    def flush_outbox(self) -> int:
        """Send queued updates; each is removed only after the broker acknowledged it."""
        sent = 0
        for path, topic, payload in self.store.pending():
            self.transport.publish(topic, payload)
            self.store.done(path)
            sent += len(payload)
        return sent

    def _read_announcement(self, payload: bytes) -> dict:
        """A round announcement; one for another base model or adapter ends the run."""
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PayloadError(f"round announcement is not JSON: {err}") from err
        if not isinstance(body, dict) or not all(
            isinstance(body.get(k), int) for k in ("round", "adapter_version")
        ):
            raise PayloadError("round announcement lacks integer round / adapter_version")
        timeout = body.setdefault("timeout_s", 0.0)
        if not isinstance(timeout, (int, float)) or not 0 <= timeout < 1e7:
            raise PayloadError(f"round announcement timeout_s {timeout!r} is not a duration")
        if body.get("base_sha256", self.base.sha256) != self.base.sha256:
            raise ConfigError(
                f"the fleet runs base {str(body['base_sha256'])[:12]}, this device "
                f"{self.base.name} ({self.base.short_hash})"
            )
        if "adapter" in body and LoraSpec.from_dict(body["adapter"]) != self.spec:
            raise ConfigError(f"the fleet tunes {body['adapter']}, this device {self.spec}")
        return body

    def _read_adapter(self, payload: bytes, current: _Global | None) -> _Global | None:
        """A pushed adapter: dense (``adapter/global``) or the seeds of one zeroth-order round
        (``adapter/global/seeds``), which apply only on top of the version they start from."""
        header, tensors = codec.decode(payload)
        check_envelope(header, "adapter", self.spec, self.base)
        if header.encoding != "seeds":
            check_layout(tensors, self.spec, self.base)
            return _Global(header.version, tensors)
        start, pool_seed = header.metrics.get("from_version"), header.metrics.get("pool_seed")
        params = header.metrics.get("params", "lora_b")
        if not (isinstance(start, int) and isinstance(pool_seed, int) and 0 <= pool_seed < 2**63):
            raise PayloadError("a seeds adapter needs integer from_version and pool_seed >= 0")
        if params not in ZO_PARAMS or set(tensors) != {"seed_index", "coef"}:
            raise PayloadError(f"a seeds adapter moves {params!r} with tensors {sorted(tensors)}")
        index = tensors["seed_index"]
        if index.shape != tensors["coef"].shape or (index.size and int(index.min()) < 0):
            raise PayloadError("a seeds adapter needs one coefficient per seed index >= 0")
        if current is None or current.version != start or header.version != start + 1:
            return None  # not on top of what this device holds: it needs the dense adapter
        tuned = self.layout.indices(params)
        pairs = list(zip(tensors["seed_index"].tolist(), tensors["coef"].tolist(), strict=True))
        theta = self.layout.flatten(current.tensors)
        theta[tuned] += replay(pairs, pool_seed, tuned.size)
        return _Global(header.version, self.layout.unflatten(theta))

    def run(self, item: ClientText, data: ClientData | None = None) -> DeviceReport:
        """Take part in rounds until the server announces the end; return what was measured.
        A ``mix`` device instead personalizes once from the fleet's basis (:meth:`run_mix`)."""
        if self.config.tuning.tuner == "mix":
            return self.run_mix(item, data)
        data = data or self.prepare(item)
        report = DeviceReport(self.device, item.client)
        init = init_lora(self.spec, self.base)
        self.backend.set_adapter(init)
        report.ppl_base = self.evaluate(data.heldout)
        log.info(
            "%s (%s): base perplexity %.1f on %d held-out windows",
            self.device,
            item.client,
            report.ppl_base,
            len(data.heldout),
        )
        transport = self.connect()
        report.bytes_up += self.flush_outbox()  # anything left from before a reboot
        zo = self.config.tuning.tuner == "zo"
        # a zeroth-order device starts from v0, which it derives from the seed, and follows the
        # rounds through their seeds; it fetches a dense adapter only when it falls behind
        current: _Global | None = _Global(0, init) if zo else None
        dense = not zo
        if zo:
            transport.subscribe(self.topics.global_seeds)
        else:
            transport.subscribe(self.topics.global_adapter)
        announcement: dict | None = None
        done_round = 0
        wait = self.config.sync.round_wait_s
        while True:
            msg = transport.recv(timeout=wait)
            if msg is None:
                raise TransportError(f"{self.device}: no message from the server for {wait:.0f} s")
            report.bytes_down += len(msg.payload)
            try:
                if msg.topic == self.topics.round:
                    announcement = self._read_announcement(msg.payload)
                    # a round may stay open for the server's timeout: wait at least that long
                    wait = max(self.config.sync.round_wait_s, announcement["timeout_s"] + 60)
                elif msg.topic in (self.topics.global_adapter, self.topics.global_seeds):
                    pushed = self._read_adapter(msg.payload, current)
                    if pushed is not None and (
                        current is None or pushed.version >= current.version
                    ):
                        current = pushed
                        self.store.save_adapter(msg.payload)
            except (PayloadError, json.JSONDecodeError) as err:
                log.error("%s: ignoring a bad message on %s: %s", self.device, msg.topic, err)
                continue
            if announcement is None:
                continue
            wanted = announcement["adapter_version"]
            if current is None or current.version != wanted:
                if current is not None and current.version > wanted:
                    continue  # an old announcement; the new one is on its way
                if not dense:  # behind: take the retained dense adapter once
                    transport.subscribe(self.topics.global_adapter)
                    dense = True
                continue
            if dense and zo:
                transport.unsubscribe(self.topics.global_adapter)
                dense = False
            round_ = announcement["round"]
            if announcement.get("done"):
                self.backend.set_adapter(current.tensors)
                report.ppl_final = self.evaluate(data.heldout)
                report.history.append({"round": round_, "ppl_global": report.ppl_final})
                log.info(
                    "%s: final global adapter v%d, perplexity %.1f",
                    self.device,
                    current.version,
                    report.ppl_final,
                )
                return report
            if round_ <= done_round:
                continue
            report.bytes_up += self._do_round(round_, current, data, report, announcement)
            done_round = round_

    def _do_round(
        self,
        round_: int,
        current: _Global,
        data: ClientData,
        report: DeviceReport,
        announcement: dict,
    ) -> int:
        self.backend.set_adapter(current.tensors)
        ppl_global = report.ppl_base if current.version == 0 else self.evaluate(data.heldout)
        t = self.config.tuning
        if t.tuner == "zo":
            if "zo" not in announcement:
                raise PayloadError("the server announced no seed pool for zeroth-order tuning")
            index, coef, metrics = self.tune_zo(data, round_, current.tensors, announcement["zo"])
            encoding, body = "seeds", {"seed_index": index, "coef": coef}
        else:
            metrics = self.tune(data, round_)
            local = self.backend.get_adapter()
            encoding = self.config.sync.uplink_encoding
            body = {k: local[k] - current.tensors[k] for k in local}
        report.ppl_local = self.evaluate(data.heldout)
        report.history.append(
            {"round": round_, "ppl_global": ppl_global, "ppl_local": report.ppl_local}
        )
        log.info(
            "%s round %d: perplexity %.1f under global v%d → %.1f after %d %s steps",
            self.device,
            round_,
            ppl_global,
            current.version,
            report.ppl_local,
            metrics["steps"],
            t.tuner,
        )
        header = codec.Header(
            kind="update",
            sender=self.device,
            round=round_,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding=encoding,
            num_examples=len(data.train),
            version=current.version,
            metrics={"ppl_local": report.ppl_local, "ppl_global": ppl_global, **metrics},
        )
        self.store.put(self.topics.update(self.device), codec.encode(header, body))
        return self.flush_outbox()
