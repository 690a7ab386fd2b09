"""The aggregation service: announce a round, collect updates until a quorum or a timeout,
aggregate, persist, and push the new global adapter (retained) to the fleet.

A bad update is refused with a logged reason (and a row in the registry); the round goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from edge_sdk import codec
from edge_sdk.adapters.lora import LoraSpec, init_lora, load_peft, save_peft
from edge_sdk.adapters.lora.flat import FlatLayout
from edge_sdk.adapters.lora.io import check_envelope, check_layout
from edge_sdk.errors import ConfigError, FleetuneError, PayloadError, TransportError
from edge_sdk.manifest import BaseManifest
from edge_sdk.transport.base import Message, Transport
from edge_sdk.transport.topics import Topics
from edge_sdk.tuners.mix import BASIS_PART, Basis, Mixer
from edge_sdk.tuners.zo import Z_VERSION, replay
from server.basis import kmeans
from server.config import ServerConfig
from server.registry import Registry
from server.strategy import STRATEGIES, Update

log = logging.getLogger(__name__)
MEMBERS = "members.safetensors"  # each device's latest adapter (B part): what the basis clusters
MAX_SEED_COEF = 1.0  # |lr * projected gradient| above this moves a 184k-entry z by norm > 400
MAX_WARM_PAIRS = 2_000  # ZO pairs a mixture may carry (replaying them blocks the server loop)


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
        self.spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, targets=config.lora_targets)
        self.strategy = STRATEGIES[config.strategy]()
        self.layout = FlatLayout(self.spec, base)
        self.tuned = self.layout.indices(config.zo_params)
        if config.state_dir:
            self.state_dir = Path(config.state_dir)
        else:
            from models.base import cache_dir

            self.state_dir = cache_dir() / "server" / config.fleet
        self.registry = Registry(self.state_dir / "registry.sqlite")
        self._transport = transport
        self.version = 0
        self.first_round = 1
        self.current = self._resume()
        self.bytes_down = 0
        # mixture personalization: each device's latest adapter (its B part), the bases offered
        # and the coefficients devices reported for each
        self.members: dict[str, np.ndarray] = {}
        self.bases: dict[int, Basis] = {}
        self.usage: dict[int, list[np.ndarray]] = {}
        self.served: set[tuple[str, str]] = set()  # (device, upload sha256): answered once
        self._resume_mixtures()

    def _resume(self) -> dict[str, np.ndarray]:
        latest = self.registry.latest_adapter()
        if latest is None:
            tensors = init_lora(self.spec, self.base)
            self._save(tensors, round_=0)
            return tensors
        self.version, path = latest
        tensors, spec = load_peft(path, self.base)
        if spec != self.spec:
            raise ConfigError(f"state in {self.state_dir} holds a {spec} adapter, not {self.spec}")
        rounds = self.registry._exec("SELECT MAX(round) FROM rounds")[0][0]
        self.first_round = int(rounds or 0) + 1
        log.info("resuming from adapter v%d at round %d", self.version, self.first_round)
        return tensors

    def _resume_mixtures(self) -> None:
        """Reload the members, the latest basis and its devices' coefficients (the prior) a
        previous run of this fleet left behind."""
        members = self.state_dir / MEMBERS
        if members.exists():
            self.members = load_file(str(members))
        latest = self.registry.latest_basis()
        if latest is None:
            return
        basis = self._load_basis(latest[0])
        for _, version, coef, _, _ in self.registry.mixtures():
            if version == basis.version and coef:
                self._use(basis, np.asarray(json.loads(coef)))

    def _use(self, basis: Basis, coef: np.ndarray) -> Basis:
        """Count a device's coefficients [K, G] for ``basis``; the prior devices start from is
        the mean of those counted (one per adapter). Returns the basis with that prior."""
        usage = self.usage.setdefault(basis.version, [])
        usage.append(coef.mean(axis=1))
        prior = np.mean(usage, axis=0).astype(np.float32)
        self.bases[basis.version] = Basis(
            basis.version, basis.vectors, basis.spec, basis.base_sha256, prior
        )
        return self.bases[basis.version]

    @property
    def mixtures_served(self) -> int:
        return len(self.served)

    def _load_basis(self, version: int) -> Basis:
        """A basis this fleet offered before, from its saved vectors; ``PayloadError`` if none."""
        if version not in self.bases:
            path = self.registry.basis_path(version)
            if path is None or not Path(path).exists():
                raise PayloadError(
                    f"mixture is over basis v{version}, which this server never offered"
                )
            self.bases[version] = Basis(version, np.load(path), self.spec, self.base.sha256)
        return self.bases[version]

    def _save_members(self) -> None:
        save_file(self.members, str(self.state_dir / MEMBERS))

    def _save(self, tensors: dict[str, np.ndarray], round_: int) -> None:
        path = save_peft(
            self.state_dir / "adapters" / f"v{self.version:04d}", tensors, self.spec, self.base
        )
        sha = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        self.registry.add_adapter(self.version, round_, sha, str(path))

    # -- messaging -------------------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise TransportError("the server is not connected: call run() or connect()")
        return self._transport

    def connect(self) -> Transport:
        if self._transport is None:
            from edge_sdk.transport.mqtt import MqttTransport

            c = self.config
            self._transport = MqttTransport(
                c.host, c.port, f"{c.fleet}-server", protocol=c.protocol
            )
        self._transport.subscribe(self.topics.all_updates)
        self._transport.subscribe(self.topics.all_status)
        self._transport.subscribe(self.topics.all_mixtures)
        self._transport.connect()
        return self._transport

    def publish_global(self, round_: int) -> int:
        header = codec.Header(
            kind="adapter",
            sender="server",
            round=round_,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding=self.config.downlink_encoding,
            version=self.version,
        )
        payload = codec.encode(header, self.current)
        self.transport.publish(self.topics.global_adapter, payload, retain=True)
        self.bytes_down += len(payload)
        return len(payload)

    def publish_seeds(self, round_: int, seeds: dict[int, float], dense_bytes: int) -> bool:
        """A zeroth-order round's result as its merged seeds, on top of the previous version:
        devices that followed the rounds rebuild the adapter from a few bytes per seed. Sent
        only when smaller than the dense adapter; a device without it fetches the dense one."""
        order = sorted(seeds)
        header = codec.Header(
            kind="adapter",
            sender="server",
            round=round_,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding="seeds",
            version=self.version,
            metrics={
                "from_version": self.version - 1,
                "pool_seed": self.pool(round_)["pool_seed"],
                "params": self.config.zo_params,
            },
        )
        body = {
            "seed_index": np.array(order, dtype=np.int32),
            "coef": np.array([seeds[i] for i in order], dtype=np.float32),
        }
        payload = codec.encode(header, body)
        if len(payload) >= dense_bytes:
            log.info("round %d: %d seeds outweigh the dense adapter", round_, len(order))
            return False
        self.transport.publish(self.topics.global_seeds, payload, retain=True)
        self.bytes_down += len(payload)
        return True

    def pool(self, round_: int) -> dict:
        """The round's seed pool (FedKSeed): devices draw their perturbations from it."""
        seed = zlib.crc32(f"{self.config.fleet}/{self.base.sha256}/{round_}".encode())
        return {
            "pool_seed": seed,
            "pool_size": self.config.zo_pool_size,
            "params": self.config.zo_params,
            "z_version": Z_VERSION,
        }

    def replay(self, seeds: dict[int, float], round_: int) -> dict[str, np.ndarray]:
        """The dense delta of merged seeds; each seed's direction is drawn once."""
        delta = np.zeros(self.layout.size, dtype=np.float32)
        delta[self.tuned] = replay(
            list(seeds.items()), self.pool(round_)["pool_seed"], self.tuned.size
        )
        return self.layout.unflatten(delta)

    def announce(self, round_: int, done: bool = False) -> None:
        body = {
            "round": round_,
            "adapter_version": self.version,
            "done": done,
            "base_sha256": self.base.sha256,
            "adapter": self.spec.to_dict(),
            "timeout_s": self.config.round_timeout_s,
            "zo": self.pool(round_),
        }
        self.transport.publish(self.topics.round, json.dumps(body).encode(), retain=True)

    # -- updates ---------------------------------------------------------------------------------
    def check_update(self, msg: Message, round_: int, seen: set[str]) -> Update:
        """Decode and validate one update; ``PayloadError`` says why it is refused."""
        device = self.topics.device_of(msg.topic)
        header, body = codec.decode(msg.payload)
        check_envelope(header, "update", self.spec, self.base)
        if header.sender != device:
            raise PayloadError(f"sender {header.sender!r} does not match topic device {device!r}")
        if header.round != round_:
            raise PayloadError(f"update is for round {header.round}, round {round_} is open")
        if header.version != self.version:
            raise PayloadError(
                f"update was computed from adapter v{header.version}, "
                f"the round's adapter is v{self.version}"
            )
        if device in seen:
            raise PayloadError(f"a second update from {device} in round {round_}")
        if header.encoding != "seeds":
            check_layout(body, self.spec, self.base)
            if self.config.basis_k and any(np.any(v) for n, v in body.items() if ".lora_A." in n):
                raise PayloadError(
                    "update moves LoRA A, but this fleet keeps a mixture basis (basis_k > 0) "
                    'whose adapters share A: tune lora_b (backprop_params = "lora_b")'
                )
            return Update(device, header.num_examples, delta=body, metrics=header.metrics)
        if header.metrics.get("z_version", Z_VERSION) != Z_VERSION:
            raise PayloadError(
                f"seeds were drawn by z version {header.metrics.get('z_version')!r}, "
                f"this server replays version {Z_VERSION}"
            )
        pool = self.pool(round_)
        if header.metrics.get("pool_seed") != pool["pool_seed"]:
            raise PayloadError(
                f"seeds were drawn from pool {header.metrics.get('pool_seed')}, "
                f"round {round_} announced pool {pool['pool_seed']}"
            )
        if header.metrics.get("params") != pool["params"]:
            raise PayloadError(
                f"seeds move {header.metrics.get('params')!r}, the fleet tunes {pool['params']!r}"
            )
        if set(body) != {"seed_index", "coef"} or body["seed_index"].shape != body["coef"].shape:
            raise PayloadError("a seeds update holds seed_index and coef, one coef per index")
        index = body["seed_index"]
        if index.size and not 0 <= int(index.min()) <= int(index.max()) < pool["pool_size"]:
            raise PayloadError(f"a seed index is outside the pool of {pool['pool_size']}")
        if body["coef"].size and float(np.abs(body["coef"]).max()) > MAX_SEED_COEF:
            raise PayloadError(f"a seed coefficient exceeds {MAX_SEED_COEF} in size")
        seeds: dict[int, float] = {}
        for index, coef in zip(body["seed_index"].tolist(), body["coef"].tolist(), strict=True):
            seeds[index] = seeds.get(index, 0.0) + coef
        return Update(device, header.num_examples, seeds=seeds, metrics=header.metrics)

    def run_round(self, round_: int) -> RoundResult:
        result = RoundResult(round_)
        start = time.monotonic()
        self.registry.open_round(round_)
        self.announce(round_)
        log.info(
            "round %d open: adapter v%d, waiting for %d updates (timeout %.0f s)",
            round_,
            self.version,
            self.config.quorum,
            self.config.round_timeout_s,
        )
        updates: list[Update] = []
        deadline = start + self.config.round_timeout_s
        while len(updates) < self.config.quorum and time.monotonic() < deadline:
            msg = self.transport.recv(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            try:
                device = self.topics.device_of(msg.topic)
            except ConfigError as err:
                log.warning("ignoring message on %s: %s", msg.topic, err)
                continue
            if msg.topic.startswith(f"{self.topics.prefix}/status/"):
                state = "online" if b"online" in msg.payload else "offline"
                self.registry.seen(device, state)
                continue
            self.registry.seen(device)
            if msg.topic == self.topics.mixture(device):
                self.handle_mixture(msg)
                continue
            try:
                update = self.check_update(msg, round_, {u.device for u in updates})
            except FleetuneError as err:
                log.warning("round %d: rejected update from %s: %s", round_, device, err)
                result.rejected.append((device, str(err)))
                self.registry.log_update(round_, device, len(msg.payload), 0, False, str(err))
                continue
            updates.append(update)
            result.accepted.append(device)
            self.registry.log_update(round_, device, len(msg.payload), update.num_examples, True)
            log.info(
                "round %d: update %d/%d from %s (%d bytes, %d examples)",
                round_,
                len(updates),
                self.config.quorum,
                device,
                len(msg.payload),
                update.num_examples,
            )
        if updates:
            before = self.current
            merged = self.strategy.aggregate(
                self.current, updates, lambda seeds: self.replay(seeds, round_)
            )
            self.current = merged.tensors
            self.version += 1
            self._save(self.current, round_)
            dense_bytes = self.publish_global(round_)
            if merged.seeds is not None:
                self.publish_seeds(round_, merged.seeds, dense_bytes)
            if self.config.basis_k:
                self.remember(updates, before, round_)
                self.refresh_basis(round_)
        else:
            log.warning(
                "round %d closed with no usable update; the global adapter stays v%d",
                round_,
                self.version,
            )
        result.version, result.seconds = self.version, time.monotonic() - start
        self.registry.close_round(round_, len(result.accepted), len(result.rejected), self.version)
        log.info(
            "round %d closed in %.0f s: %d accepted, %d rejected → adapter v%d",
            round_,
            result.seconds,
            len(result.accepted),
            len(result.rejected),
            self.version,
        )
        return result

    def run(self) -> list[RoundResult]:
        """Run the configured rounds, then announce the end with the final adapter."""
        self.connect()
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

    # -- mixture personalization -------------------------------------------------------------------
    def remember(self, updates: list[Update], before: dict[str, np.ndarray], round_: int) -> None:
        """Keep each device's adapter after this round (the round's global plus its update) if
        it kept A at the shared init: only those mix exactly with the others."""
        index = self.layout.indices(BASIS_PART)
        shared_a = self.layout.indices("lora_a")
        start = self.layout.flatten(before)
        init_a = self.layout.flatten(init_lora(self.spec, self.base))[shared_a]
        for update in updates:
            delta = update.delta or self.replay(update.seeds or {}, round_)
            theta = start + self.layout.flatten(delta)
            if not np.array_equal(theta[shared_a], init_a):
                log.info(
                    "round %d: %s moved LoRA A, so its adapter does not enter the basis "
                    "(tune with backprop_params = lora_b or zeroth-order lora_b)",
                    round_,
                    update.device,
                )
                continue
            self.members[update.device] = theta[index]
        self._save_members()

    def refresh_basis(self, round_: int) -> Basis | None:
        """Cluster the devices' adapters into ``basis_k`` centroids and push them (retained).
        The server keeps the basis exactly as devices decode it."""
        if not self.members:
            return None
        names = sorted(self.members)
        centroids, labels = kmeans(
            np.stack([self.members[n] for n in names]), self.config.basis_k, seed=round_
        )
        version = max(self.bases, default=0) + 1
        self.bases = {v: b for v, b in self.bases.items() if v > version - 4}  # the last few
        basis = self._publish_basis(Basis(version, centroids, self.spec, self.base.sha256), round_)
        path = self.state_dir / "bases" / f"v{version:04d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, basis.vectors)
        clusters = {n: int(c) for n, c in zip(names, labels, strict=True)}
        self.registry.add_basis(version, round_, basis.k, json.dumps(clusters), str(path))
        log.info("basis v%d: %d adapters from %d devices", version, basis.k, len(names))
        return basis

    def _publish_basis(self, basis: Basis, round_: int) -> Basis:
        """Push ``basis`` (retained) and keep it exactly as devices decode it."""
        payload = basis.encode(round_, self.config.basis_encoding)
        self.bases[basis.version] = Basis.decode(payload)
        self.transport.publish(self.topics.basis, payload, retain=True)
        self.bytes_down += len(payload)
        return self.bases[basis.version]

    def handle_mixture(self, msg: Message) -> bool:
        """A device's coefficients: record them, push the personalized adapter back (retained
        on the device's own topic) and fold them into the prior new devices start from."""
        device = self.topics.device_of(msg.topic)
        sha = hashlib.sha256(msg.payload).hexdigest()
        if (device, sha) in self.served:
            log.info("mixture from %s: a redelivery of one already answered", device)
            return False
        try:
            header, body = codec.decode(msg.payload)
            check_envelope(header, "mixture", self.spec, self.base)
            if header.sender != device:
                raise PayloadError(
                    f"sender {header.sender!r} does not match topic device {device!r}"
                )
            basis = self._load_basis(header.version)
            coef = body.get("coef")
            if coef is None or coef.ndim != 2 or coef.shape[0] != basis.k:
                raise PayloadError(f"mixture coef must be [{basis.k}, groups]")
            mixer = Mixer(basis, self.base, groups=coef.shape[1])
            theta = mixer.flat(mixer.check_coef(coef))
            if "zo" in header.metrics:
                theta[mixer.index] += self._warm_zo_delta(header.metrics["zo"], mixer.index.size)
            loss = header.metrics.get("heldout_loss")
            if loss is not None and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
                raise PayloadError(f"mixture heldout_loss {loss!r} is not a finite number")
        except FleetuneError as err:
            log.warning("rejected mixture from %s: %s", device, err)
            self.registry.log_mixture(device, -1, reason=str(err))
            return False
        adapter = self.layout.unflatten(theta)
        # the device's adapter joins the members: the next basis clusters what devices use
        self.members[device] = theta[mixer.index]
        self._save_members()
        cluster = int(np.argmax(coef.sum(axis=1)))
        self.registry.log_mixture(device, basis.version, json.dumps(coef.tolist()), loss, cluster)
        out = codec.Header(
            kind="adapter",
            sender="server",
            round=header.round,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding=self.config.downlink_encoding,
            version=self.version,
            metrics={"basis_version": basis.version, "cluster": cluster, "mixture_sha256": sha},
        )
        payload = codec.encode(out, adapter)
        self.transport.publish(self.topics.personal(device), payload, retain=True)
        self.bytes_down += len(payload)
        self.served.add((device, sha))
        basis = self._use(basis, coef)
        if basis.version == max(self.bases):
            self._publish_prior(basis)
        log.info(
            "mixture from %s over basis v%d: coefficients %s, leans on adapter %d",
            device,
            basis.version,
            np.round(coef.reshape(-1), 2).tolist(),
            cluster,
        )
        return True

    def _publish_prior(self, basis: Basis) -> None:
        """The coefficients new devices start from: a few bytes on their own retained topic,
        so the basis itself is not pushed again after every mixture."""
        body = {
            "version": basis.version,
            "prior": np.asarray(basis.prior).tolist(),
            "devices": len(self.usage[basis.version]),
        }
        payload = json.dumps(body).encode()
        self.transport.publish(self.topics.basis_prior, payload, retain=True)
        self.bytes_down += len(payload)

    @staticmethod
    def _warm_zo_delta(zo: object, size: int) -> np.ndarray:
        """The delta of the ZO steps a device ran after its mixture (seeds in its metrics)."""
        if not isinstance(zo, dict):
            raise PayloadError("mixture zo must be an object")
        try:
            pool_seed, pool_size = int(zo["pool_seed"]), int(zo["pool_size"])
            pairs = [(int(i), float(c)) for i, c in zo["pairs"]]
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise PayloadError(f"mixture zo must hold pool_seed, pool_size, pairs: {err}") from err
        if not 0 <= pool_seed < 2**63:
            raise PayloadError(f"mixture zo pool_seed {pool_seed} is outside 0..2**63")
        if len(pairs) > MAX_WARM_PAIRS or any(not 0 <= i < pool_size for i, _ in pairs):
            raise PayloadError(
                f"mixture zo holds over {MAX_WARM_PAIRS} pairs or indices outside {pool_size}"
            )
        if not all(math.isfinite(c) and abs(c) <= MAX_SEED_COEF for _, c in pairs):
            raise PayloadError(f"mixture zo coefficients must be finite, at most {MAX_SEED_COEF}")
        return replay(pairs, pool_seed, size)

    def serve_mixtures(self, count: int, timeout_s: float) -> int:
        """Answer mixture uploads until ``count`` were served or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        log.info("serving mixtures: waiting for %d devices (timeout %.0f s)", count, timeout_s)
        while self.mixtures_served < count and time.monotonic() < deadline:
            msg = self.transport.recv(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            try:
                device = self.topics.device_of(msg.topic)
            except ConfigError:
                continue
            if msg.topic == self.topics.mixture(device):
                self.registry.seen(device)
                self.handle_mixture(msg)
        return self.mixtures_served

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.registry.close()
