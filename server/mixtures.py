"""The mixture service: keep each device's adapter, cluster them into a basis (k-means), answer
each device's coefficients with its personalized adapter, and keep the prior new devices start
from (the mean of the coefficients devices reported)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import FleetuneError, PayloadError
from fleetune.edge_sdk.protocol import (
    BASIS_PART,
    Basis,
    MixtureUpload,
    PersonalAdapter,
    Prior,
)
from fleetune.edge_sdk.transport.base import Message
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.edge_sdk.tuners.mix import Mixer
from fleetune.edge_sdk.tuners.zo import apply_run
from fleetune.server.basis import kmeans
from fleetune.server.state import ServerState
from fleetune.server.strategy import Update

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes], None]  # (topic, payload), retained
Tensors = dict[str, np.ndarray]
KEEP_BASES = 4  # bases a mixture may still be over


class MixtureService:
    def __init__(
        self,
        state: ServerState,
        topics: Topics,
        publish: Publish,
        basis_k: int,
        basis_encoding: str = "q8",
        downlink_encoding: str = "f16",
    ) -> None:
        self.state, self.topics, self.publish = state, topics, publish
        self.fleet = state.fleet
        self.layout = FlatLayout(self.fleet.spec, self.fleet.base)
        self.basis_k, self.basis_encoding = basis_k, basis_encoding
        self.downlink_encoding = downlink_encoding
        self.members: dict[str, np.ndarray] = state.load_members()
        self.bases: dict[int, Basis] = {}
        self.usage: dict[int, list[np.ndarray]] = {}  # basis version -> devices' coefficients
        self.served: set[tuple[str, str]] = set()  # (device, upload sha256): answered once
        self._resume()

    def _resume(self) -> None:
        """The latest basis and the coefficients devices reported for it (the prior)."""
        latest = self.state.registry.latest_basis()
        if latest is None:
            return
        basis = self.basis(latest[0])
        for _, version, coef, _, _ in self.state.registry.mixtures():
            if version == basis.version and coef:
                self._use(basis, np.asarray(json.loads(coef)))

    def basis(self, version: int) -> Basis:
        """A basis this fleet offered; ``PayloadError`` if it never did."""
        if version not in self.bases:
            vectors = self.state.basis_vectors(version)
            self.bases[version] = Basis(version, vectors, self.fleet.spec, self.fleet.base.sha256)
        return self.bases[version]

    def _use(self, basis: Basis, coef: np.ndarray) -> Basis:
        """Count a device's coefficients [K, G]; the prior is the mean of those counted."""
        usage = self.usage.setdefault(basis.version, [])
        usage.append(coef.mean(axis=1))
        self.bases[basis.version] = basis.with_prior(np.mean(usage, axis=0).astype(np.float32))
        return self.bases[basis.version]

    # -- after a round ----------------------------------------------------------------------------
    def remember(
        self,
        updates: list[Update],
        before: Tensors,
        round_: int,
        replay: Callable[[dict[int, float]], Tensors],
    ) -> None:
        """Keep each device's adapter after this round (the round's global plus its update) if
        it kept A at the shared init: only those mix exactly with the others."""
        index = self.layout.indices(BASIS_PART)
        shared_a = self.layout.indices("lora_a")
        start = self.layout.flatten(before)
        init_a = self.layout.flatten(init_lora(self.fleet.spec, self.fleet.base))[shared_a]
        for update in updates:
            delta = update.delta or replay(update.seeds or {})
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
        self.state.save_members(self.members)

    def refresh_basis(self, round_: int) -> Basis | None:
        """Cluster the members into ``basis_k`` centroids and push them (retained). The server
        keeps the basis exactly as devices decode it."""
        if not self.members:
            return None
        names = sorted(self.members)
        centroids, labels = kmeans(
            np.stack([self.members[n] for n in names]), self.basis_k, seed=round_
        )
        version = max(self.bases, default=0) + 1
        self.bases = {v: b for v, b in self.bases.items() if v > version - KEEP_BASES}
        offered = Basis(version, centroids, self.fleet.spec, self.fleet.base.sha256)
        payload = offered.encode(round_, self.basis_encoding)
        basis = self.bases[version] = Basis.decode(payload)
        self.publish(self.topics.basis, payload)
        path = self.state.save_basis(version, basis.vectors)
        clusters = {n: int(c) for n, c in zip(names, labels, strict=True)}
        self.state.registry.add_basis(version, round_, basis.k, json.dumps(clusters), str(path))
        log.info("basis v%d: %d adapters from %d devices", version, basis.k, len(names))
        return basis

    # -- a device's coefficients ------------------------------------------------------------------
    def handle(self, msg: Message, version: int = 0) -> bool:
        """Record a device's coefficients, push its personalized adapter back (retained on its
        own topic) and fold them into the prior. False if refused or already answered."""
        device = self.topics.device_of(msg.topic)
        sha = hashlib.sha256(msg.payload).hexdigest()
        if (device, sha) in self.served:
            log.info("mixture from %s: a redelivery of one already answered", device)
            return False
        try:
            upload = MixtureUpload.decode(msg.payload, self.fleet)
            if upload.sender != device:
                raise PayloadError(
                    f"sender {upload.sender!r} does not match topic device {device!r}"
                )
            basis = self.basis(upload.basis_version)
            if upload.coef.shape[0] != basis.k:
                raise PayloadError(f"mixture coef must be [{basis.k}, groups]")
            mixer = Mixer(basis, self.fleet.base, groups=upload.coef.shape[1])
            theta = mixer.flat(upload.coef)
            if upload.zo is not None:
                theta = apply_run(theta, mixer.index, upload.zo)
        except FleetuneError as err:
            log.warning("rejected mixture from %s: %s", device, err)
            self.state.registry.log_mixture(device, -1, reason=str(err))
            return False
        # the device's adapter joins the members: the next basis clusters what devices use
        self.members[device] = theta[mixer.index]
        self.state.save_members(self.members)
        coef = upload.coef
        cluster = int(np.argmax(coef.sum(axis=1)))
        self.state.registry.log_mixture(
            device, basis.version, json.dumps(coef.tolist()), upload.heldout_loss, cluster
        )
        answer = PersonalAdapter(
            self.layout.unflatten(theta), sha, basis.version, cluster, version=version
        )
        self.publish(
            self.topics.personal(device), answer.encode(self.fleet, self.downlink_encoding)
        )
        self.served.add((device, sha))
        basis = self._use(basis, coef)
        if basis.version == max(self.bases):
            prior = Prior(basis.version, np.asarray(basis.prior), len(self.usage[basis.version]))
            self.publish(self.topics.basis_prior, prior.encode())
        log.info(
            "mixture from %s over basis v%d: coefficients %s, leans on adapter %d",
            device,
            basis.version,
            np.round(coef.reshape(-1), 2).tolist(),
            cluster,
        )
        return True
