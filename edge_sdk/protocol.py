"""Every message on the wire, typed, encoded and validated in one place; device and server both
use this module. Long because that is its point: one file holds the whole wire protocol.

=========================  ==============================  =====================================
message                    topic (``transport/topics.py``)  bytes
=========================  ==============================  =====================================
:class:`Announcement`      ``round``                        JSON
:class:`Update`            ``update/{device}``              envelope, kind "update" (dense or seeds)
:class:`GlobalAdapter`     ``adapter/global``               envelope, kind "adapter"
:class:`GlobalSeeds`       ``adapter/global/seeds``         envelope, kind "adapter", seeds body
:class:`Basis`             ``adapter/basis``                envelope, kind "basis"
:class:`Prior`             ``adapter/basis/prior``          JSON
:class:`MixtureUpload`     ``mixture/{device}``             envelope, kind "mixture"
:class:`PersonalAdapter`   ``adapter/device/{device}``,     envelope, kind "adapter"
                           ``adapter/cluster/{c}``
:class:`DeviceStatus`      ``status/{device}``              JSON
:class:`Unmask`            ``secagg/unmask``                JSON (a round's dropped devices)
:class:`Reveal`            ``secagg/reveal/{device}``       JSON (pair seeds with dropped ones)
=========================  ==============================  =====================================

``decode`` takes any bytes and returns a valid message or raises a :class:`PayloadError` that names
the problem: sizes and nesting are bounded before parsing, every number is range-checked (a JSON
integer can be 2**63, a float Infinity), and the whole message is checked before anything uses it.
Checks that need the receiver's state (is this round open, is this the adapter version the
round started from) stay with the receiver.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import PARTS, FlatLayout
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.secagg import check_range
from fleetune.edge_sdk.transport.topics import check_id

Tensors = dict[str, np.ndarray]
MAX_JSON_BYTES = 64 * 1024  # announcements, priors, statuses
MAX_INT = 2**63 - 1  # what SQLite and numpy int64 hold
# Bump Z_VERSION if the way zeroth-order perturbations are drawn changes (tuners/zo.py:
# 2 = one float32 standard_normal vector per pool from PCG64(pool_seed) over the tuned entries
# in their order, rotated by index * 7919; 1 drew PCG64([pool_seed, index]) per seed): the
# server must replay the directions the device stepped along. Devices refuse a pool that names
# another version.
Z_VERSION = 2
ZO_PARTS = ("lora_b", "all")  # what zeroth-order steps move
UPDATE_PARTS = ("all", "lora_a")  # what a dense update sends (lora_a: shared A, personal B)
BASIS_PART = "lora_b"  # what a basis spans; A is the fleet's shared init
MAX_MIX_COEF = 100.0  # larger mixture coefficients are refused as garbage
MAX_SEED_COEF = 1.0  # |lr * projected gradient| above this moves a 184k-entry z by norm > 400
MAX_WARM_PAIRS = 2_000  # ZO pairs a mixture upload may carry (the server replays them)
STATES = ("online", "offline")
MAX_REFUSED_CHARS = 400  # a device's report of a push it refused
MAX_COHORT = 400  # devices in one secure-aggregation round (the announcement stays < 64 KB)
MAX_CLUSTERS = 64  # cluster adapters a fleet keeps, numbered 0..63 (adapter/cluster/{c})


# -- shared checks --------------------------------------------------------------------------------
def read_json(payload: bytes, what: str) -> dict[str, Any]:
    """A bounded JSON object; anything else is a ``PayloadError`` naming ``what``."""
    if not isinstance(payload, (bytes, bytearray)):
        raise PayloadError(f"{what} must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_JSON_BYTES:
        raise PayloadError(f"{what} is {len(payload)} bytes, over the {MAX_JSON_BYTES} limit")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PayloadError(f"{what} is not JSON: {str(err)[:200]}") from err
    if not isinstance(body, dict):
        raise PayloadError(f"{what} is a JSON {type(body).__name__}, not an object")
    return body


def integer(value: object, name: str, low: int = 0, high: int = MAX_INT) -> int:
    """``value`` as an int in [low, high] (bools refused); else ``PayloadError``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PayloadError(f"{name} must be an integer in {low}..{high}, got {value!r:.60}")
    return value


def number(value: object, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in [low, high]; else ``PayloadError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not low <= float(value) <= high:  # type: ignore[arg-type]
        raise PayloadError(f"{name} must be a finite number in [{low}, {high}], got {value!r:.60}")
    return float(value)  # type: ignore[arg-type]


def check_envelope(header: codec.Header, kind: str, spec: LoraSpec, base: BaseManifest) -> LoraSpec:
    """An envelope must be of ``kind`` and for this base and adapter spec; returns the spec it
    names. Windows nest: an ``update`` may hold a sub-window of the fleet's layers (a window
    device in a fleet that tunes deeper), and an ``adapter`` pushed to such a device holds the
    fleet's wider one (``LoraSpec.within``)."""
    if header.kind != kind:
        raise PayloadError(f"expected kind {kind!r}, got {header.kind!r}")
    if header.base_sha256 != base.sha256:
        raise PayloadError(
            f"{kind} is for base {header.base_sha256[:12]}, not {base.name} ({base.short_hash})",
            "other_model",
        )
    theirs = LoraSpec.from_dict(header.adapter)
    nested = (kind == "update" and theirs.within(spec)) or (
        kind == "adapter" and spec.within(theirs)
    )
    if theirs != spec and (not nested or theirs.window > base.num_layers):
        raise PayloadError(
            f"{kind} adapter spec {header.adapter} is not {spec.to_dict()}", "other_model"
        )
    return theirs


@dataclass(frozen=True)
class Fleet:
    """What both sides validate messages against: the base model and the adapter spec."""

    base: BaseManifest
    spec: LoraSpec

    def header(self, kind: str, sender: str, encoding: str = "f32", **fields: Any) -> codec.Header:
        return codec.Header(
            kind=kind,
            sender=sender,
            base_sha256=self.base.sha256,
            adapter=self.spec.to_dict(),
            encoding=encoding,
            **{"round": 0, **fields},
        )

    def open(self, payload: bytes, kind: str) -> tuple[codec.Header, Tensors]:
        """Decode an envelope of ``kind`` for this fleet (or a nested window of it)."""
        header, tensors = codec.decode(payload)
        check_envelope(header, kind, self.spec, self.base)
        return header, tensors

    @staticmethod
    def spec_of(header: codec.Header) -> LoraSpec:
        """The adapter spec an opened envelope names (this fleet's, or a nested window)."""
        return LoraSpec.from_dict(header.adapter)

    def check_dense(self, header: codec.Header, tensors: Tensors) -> Tensors:
        """Dense adapter tensors (not seeds) in the LoRA layout the envelope names."""
        if header.encoding == "seeds":
            raise PayloadError(f"a dense {header.kind} was expected, got seeds")
        check_layout(tensors, self.spec_of(header), self.base)
        return tensors

    def narrow(self, tensors: Tensors) -> Tensors:
        """This fleet's tensors of an adapter that may hold more layers (a nested window)."""
        return {name: tensors[name] for name, _ in self.spec.layout(self.base)}

    def open_dense(self, payload: bytes, kind: str) -> tuple[codec.Header, Tensors]:
        header, tensors = self.open(payload, kind)
        return header, self.check_dense(header, tensors)


# -- zeroth-order seeds -------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedPool:
    """The seeds a round's zeroth-order devices draw from (FedKSeed), in its announcement."""

    pool_seed: int
    pool_size: int
    params: str = "lora_b"
    z_version: int = Z_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool_seed": self.pool_seed,
            "pool_size": self.pool_size,
            "params": self.params,
            "z_version": self.z_version,
        }

    @classmethod
    def from_dict(cls, data: object) -> SeedPool:
        if not isinstance(data, dict):
            raise PayloadError("a seed pool must be an object")
        params = data.get("params", "lora_b")
        if params not in ZO_PARTS:
            raise PayloadError(f"seed pool params {params!r:.40} is not one of {ZO_PARTS}")
        return cls(
            integer(data.get("pool_seed"), "pool_seed"),
            integer(data.get("pool_size"), "pool_size", 1, 2**31 - 1),
            params,
            integer(data.get("z_version", Z_VERSION), "z_version"),
        )


@dataclass(frozen=True)
class SeedRun:
    """A zeroth-order run: seed indices of a pool with their coefficients. The delta it stands
    for is ``sum(coef * z(pool_seed, index))`` over the ``params`` entries (tuners/zo.py)."""

    pool_seed: int
    index: np.ndarray  # int32 [n], >= 0
    coef: np.ndarray  # float32 [n], finite
    params: str = "lora_b"
    z_version: int = Z_VERSION

    def __post_init__(self) -> None:
        index, coef = np.asarray(self.index), np.asarray(self.coef)
        if index.ndim != 1 or coef.shape != index.shape:
            raise PayloadError(f"seed indices {index.shape} and coefficients {coef.shape} differ")
        if index.size and (not np.issubdtype(index.dtype, np.integer) or int(index.min()) < 0):
            raise PayloadError("seed indices must be non-negative integers")
        if not np.all(np.isfinite(coef)):
            raise PayloadError("seed coefficients must be finite")
        integer(self.pool_seed, "pool_seed")
        if self.params not in ZO_PARTS:
            raise PayloadError(f"seeds move {self.params!r:.40}, not one of {ZO_PARTS}")
        object.__setattr__(self, "index", index.astype(np.int32))
        object.__setattr__(self, "coef", coef.astype(np.float32))

    @classmethod
    def from_pairs(
        cls, pairs: list[tuple[int, float]], pool_seed: int, params: str = "lora_b"
    ) -> SeedRun:
        return cls(
            pool_seed,
            np.array([i for i, _ in pairs], dtype=np.int32),
            np.array([c for _, c in pairs], dtype=np.float32),
            params,
        )

    def pairs(self) -> list[tuple[int, float]]:
        return list(zip(self.index.tolist(), self.coef.tolist(), strict=True))

    def merged(self) -> dict[int, float]:
        """Coefficients summed per seed index."""
        seeds: dict[int, float] = {}
        for index, coef in self.pairs():
            seeds[index] = seeds.get(index, 0.0) + coef
        return seeds

    def check(self, pool_size: int, max_coef: float = MAX_SEED_COEF, max_pairs: int = 0) -> None:
        """Every index inside the pool, every coefficient and every index's summed coefficient
        at most ``max_coef`` in size, and at most ``max_pairs`` pairs (0: no limit)."""
        if max_pairs and self.index.size > max_pairs:
            raise PayloadError(f"{self.index.size} seed pairs are over the limit of {max_pairs}")
        if self.index.size and int(self.index.max()) >= pool_size:
            raise PayloadError(f"a seed index is outside the pool of {pool_size}")
        if self.coef.size and float(np.abs(self.coef).max()) > max_coef:
            raise PayloadError(f"a seed coefficient exceeds {max_coef} in size")
        # per seed index too: one index repeated with the largest allowed coefficient would
        # otherwise move the adapter that many times as far
        if self.index.size and max(abs(c) for c in self.merged().values()) > max_coef:
            raise PayloadError(f"the coefficients of one seed index sum beyond {max_coef}")

    def body(self) -> Tensors:
        return {"seed_index": self.index, "coef": self.coef}

    def meta(self) -> dict[str, Any]:
        return {"pool_seed": self.pool_seed, "params": self.params, "z_version": self.z_version}

    @classmethod
    def from_body(cls, metrics: dict, body: Tensors) -> SeedRun:
        if set(body) != {"seed_index", "coef"}:
            raise PayloadError(f"a seeds body holds seed_index and coef, got {sorted(body)}")
        return cls(
            integer(metrics.get("pool_seed"), "pool_seed"),
            body["seed_index"],
            body["coef"],
            metrics.get("params", "lora_b"),
            integer(metrics.get("z_version", Z_VERSION), "z_version"),
        )

    def to_json(self, pool_size: int) -> dict[str, Any]:
        return {"pool_seed": self.pool_seed, "pool_size": pool_size, "pairs": self.pairs()}

    @classmethod
    def from_json(cls, data: object, max_pairs: int = MAX_WARM_PAIRS) -> tuple[SeedRun, int]:
        """``{"pool_seed", "pool_size", "pairs": [[index, coef], ...]}`` → the run and its pool
        size, checked against both."""
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
            raise PayloadError("zo seeds must be an object with pool_seed, pool_size, pairs")
        pool_size = integer(data.get("pool_size"), "pool_size", 1, 2**31 - 1)
        raw = data["pairs"]
        if len(raw) > max_pairs:
            raise PayloadError(f"{len(raw)} seed pairs are over the limit of {max_pairs}")
        pairs = []
        for pair in raw:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PayloadError("each seed pair is [index, coefficient]")
            pairs.append(
                (integer(pair[0], "seed index", 0, pool_size - 1), number(pair[1], "coef"))
            )
        run = cls.from_pairs(pairs, integer(data.get("pool_seed"), "pool_seed"))
        run.check(pool_size)
        return run, pool_size


# -- round announcement ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Announcement:
    """The server's retained word on the round: which adapter version to start from, the seed
    pool, how long the round stays open, and whether the rounds are done."""

    round: int
    adapter_version: int
    base_sha256: str = ""
    adapter: dict | None = None  # the fleet's LoRA spec (LoraSpec.to_dict())
    timeout_s: float = 0.0
    done: bool = False
    zo: SeedPool | None = None
    secagg: SecAggRound | None = None

    def encode(self) -> bytes:
        body = {
            "round": self.round,
            "adapter_version": self.adapter_version,
            "done": self.done,
            "base_sha256": self.base_sha256,
            "adapter": self.adapter,
            "timeout_s": self.timeout_s,
            "zo": None if self.zo is None else self.zo.to_dict(),
            "secagg": None if self.secagg is None else self.secagg.to_dict(),
        }
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Announcement:
        body = read_json(payload, "round announcement")
        sha = body.get("base_sha256", "")
        if not isinstance(sha, str) or len(sha) not in (0, 64):
            raise PayloadError("round announcement base_sha256 must be a 64-character digest")
        adapter = body.get("adapter")
        if adapter is not None:
            LoraSpec.from_dict(adapter)  # a PayloadError if it is no LoRA spec
        done = body.get("done", False)
        if not isinstance(done, bool):
            raise PayloadError("round announcement done must be true or false")
        zo, secagg = body.get("zo"), body.get("secagg")
        return cls(
            round=integer(body.get("round"), "round announcement round"),
            adapter_version=integer(body.get("adapter_version"), "adapter_version"),
            base_sha256=sha,
            adapter=adapter,
            timeout_s=number(body.get("timeout_s", 0.0), "timeout_s", 0.0, 1e7),
            done=done,
            zo=None if zo is None else SeedPool.from_dict(zo),
            secagg=None if secagg is None else SecAggRound.from_dict(secagg),
        )

    def check(self, fleet: Fleet) -> None:
        """A fleet that runs another base or adapter is a ``ConfigError``: this device cannot
        take part, and retrying will not help."""
        if self.base_sha256 and self.base_sha256 != fleet.base.sha256:
            raise ConfigError(
                f"the fleet runs base {self.base_sha256[:12]}, this device "
                f"{fleet.base.name} ({fleet.base.short_hash})"
            )
        if self.adapter is not None and not fleet.spec.within(LoraSpec.from_dict(self.adapter)):
            raise ConfigError(
                f"the fleet tunes {self.adapter}, this device {fleet.spec.to_dict()}: a device "
                "may tune the fleet's adapter or its top layers (a window within the fleet's, "
                "same r, alpha, targets and init), not another one"
            )


# -- device → server ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Update:
    """A device's round result against adapter ``from_version``: a dense delta or a seed run.
    ``part="lora_a"`` (shared A, personal B: FedSA-LoRA) sends the A matrices only; B never
    leaves the device, and the decoded delta holds zeros there. A window device in a fleet
    that tunes deeper sends its window's layers only: decoded, ``spec`` names that window and
    the delta holds its tensors alone (``None``: the fleet's whole adapter)."""

    sender: str
    round: int
    from_version: int
    num_examples: int
    delta: Tensors | None = None
    seeds: SeedRun | None = None
    metrics: dict = field(default_factory=dict)
    part: str = "all"
    masked: np.ndarray | None = None  # secure aggregation: the masked flat update (uint32)
    spec: LoraSpec | None = None  # decoded: the window it holds, when narrower than the fleet's

    def encode(self, fleet: Fleet, encoding: str = "q8") -> bytes:
        if self.masked is not None:
            if self.delta is not None or self.seeds is not None or self.part != "all":
                raise PayloadError("a masked update carries nothing else")
            header = fleet.header(
                "update",
                self.sender,
                "secagg",
                round=self.round,
                num_examples=self.num_examples,
                version=self.from_version,
                metrics=self.metrics,
            )
            return codec.encode(header, {"masked": self.masked})
        if (self.delta is None) == (self.seeds is None):
            raise PayloadError("an update carries a dense delta or seeds, exactly one")
        if self.part not in UPDATE_PARTS or (self.part != "all" and self.seeds is not None):
            raise PayloadError(f"a dense update sends part {UPDATE_PARTS}, got {self.part!r}")
        metrics = {**self.metrics, **(self.seeds.meta() if self.seeds is not None else {})}
        body = self.seeds.body() if self.seeds is not None else self.delta
        if self.part != "all" and body is not None:
            metrics["part"] = self.part
            body = {k: v for k, v in body.items() if PARTS[self.part] in k}
        header = fleet.header(
            "update",
            self.sender,
            "seeds" if self.seeds is not None else encoding,
            round=self.round,
            num_examples=self.num_examples,
            version=self.from_version,
            metrics=metrics,
        )
        assert body is not None  # checked above: exactly one of the two
        return codec.encode(header, body)

    @classmethod
    def decode(cls, payload: bytes, fleet: Fleet) -> Update:
        header, body = fleet.open(payload, "update")
        seeds, delta, masked, part = None, None, None, header.metrics.get("part", "all")
        spec = fleet.spec_of(header)
        if header.encoding == "secagg":
            masked = body["masked"]
            if masked.shape != (FlatLayout(fleet.spec, fleet.base).size,) or part != "all":
                raise PayloadError(f"a masked update of {masked.shape} does not fit the adapter")
            if spec != fleet.spec:
                raise PayloadError(
                    f"a masked update must cover the fleet's whole adapter, not a window of "
                    f"{spec.window} layers (the secure sum adds every device's vector as one)"
                )
        elif header.encoding == "seeds":
            seeds = SeedRun.from_body(header.metrics, body)
        elif part == "all":
            delta = fleet.check_dense(header, body)
        elif part in UPDATE_PARTS:
            check_layout(body, spec, fleet.base, part)
            delta = {
                name: body[name] if name in body else np.zeros(shape, np.float32)
                for name, shape in spec.layout(fleet.base)
            }
        if part not in UPDATE_PARTS or (part != "all" and seeds is not None):
            raise PayloadError(f"update part {str(part)!r:.40} is not one of {UPDATE_PARTS}")
        return cls(
            header.sender,
            header.round,
            header.version,
            header.num_examples,
            delta,
            seeds,
            header.metrics,
            part,
            masked,
            None if spec == fleet.spec else spec,
        )


@dataclass(frozen=True)
class MixtureUpload:
    """A device's mixing coefficients [K, G] over basis ``basis_version``, with what it measured
    and, optionally, the seeds of the ZO steps it ran after the mix."""

    sender: str
    basis_version: int
    coef: np.ndarray
    num_examples: int = 0
    heldout_loss: float | None = None
    metrics: dict = field(default_factory=dict)  # val_loss, val_loss_start, steps
    zo: SeedRun | None = None
    zo_pool_size: int = 0

    def encode(self, fleet: Fleet) -> bytes:
        metrics = dict(self.metrics)
        if self.heldout_loss is not None:
            metrics["heldout_loss"] = self.heldout_loss
        if self.zo is not None:
            metrics["zo"] = self.zo.to_json(self.zo_pool_size)
        header = fleet.header(
            "mixture",
            self.sender,
            num_examples=self.num_examples,
            version=self.basis_version,
            metrics=metrics,
        )
        return codec.encode(header, {"coef": np.asarray(self.coef, dtype=np.float32)})

    @classmethod
    def decode(cls, payload: bytes, fleet: Fleet) -> MixtureUpload:
        header, body = fleet.open(payload, "mixture")
        coef = body.get("coef")
        if set(body) != {"coef"} or coef is None or coef.ndim != 2 or coef.size == 0:
            raise PayloadError("a mixture holds one 2-D coef tensor [K, groups]")
        check_coef(coef)
        metrics = dict(header.metrics)
        loss = metrics.pop("heldout_loss", None)
        zo, pool_size = None, 0
        if "zo" in metrics:
            zo, pool_size = SeedRun.from_json(metrics.pop("zo"))
        return cls(
            header.sender,
            header.version,
            coef,
            header.num_examples,
            None if loss is None else number(loss, "mixture heldout_loss"),
            metrics,
            zo,
            pool_size,
        )


def check_coef(coef: np.ndarray, what: str = "coefficients") -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
        coef = np.asarray(coef, dtype=np.float32)
    if not np.all(np.isfinite(coef)) or np.abs(coef).max(initial=0.0) > MAX_MIX_COEF:
        raise PayloadError(f"{what} must be finite and within ±{MAX_MIX_COEF}")
    return coef


@dataclass(frozen=True)
class DeviceStatus:
    """``online`` when a device connects; ``offline`` as its last will or when it closes.
    ``refused`` says which push the device refused and why (a bad signature is somebody
    tampering with the fleet: the server logs and records it)."""

    state: str
    refused: str = ""
    masking_key: str = ""  # the device's X25519 key for secure aggregation (64 hex digits)

    def encode(self) -> bytes:
        body = {"state": self.state}
        if self.refused:
            body["refused"] = self.refused[:MAX_REFUSED_CHARS]
        if self.masking_key:
            body["masking_key"] = self.masking_key
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, payload: bytes) -> DeviceStatus:
        body = read_json(payload, "device status")
        state, refused = body.get("state"), body.get("refused", "")
        if state not in STATES:
            raise PayloadError(f"device status state {state!r:.40} is not one of {STATES}")
        if not isinstance(refused, str) or len(refused) > MAX_REFUSED_CHARS:
            raise PayloadError(f"device status: refused must be text of <= {MAX_REFUSED_CHARS}")
        key = body.get("masking_key", "")
        return cls(state, refused, hex_key(key, "device status masking_key") if key else "")


# -- server → devices ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalAdapter:
    """The fleet's adapter, version ``version``, as dense tensors (decoded on a window device in
    a fleet that tunes deeper: all of the fleet's layers, ``rounds.use`` splits them)."""

    version: int
    tensors: Tensors
    round: int = 0

    def encode(self, fleet: Fleet, encoding: str = "f16") -> bytes:
        header = fleet.header("adapter", "server", encoding, round=self.round, version=self.version)
        return codec.encode(header, self.tensors)

    @classmethod
    def decode(cls, payload: bytes, fleet: Fleet) -> GlobalAdapter:
        header, tensors = fleet.open_dense(payload, "adapter")
        return cls(header.version, tensors, header.round)


@dataclass(frozen=True)
class GlobalSeeds:
    """A zeroth-order round's result as merged seeds on top of ``version - 1``: a device that
    holds that version rebuilds the new adapter bit-for-bit from a few bytes per seed."""

    version: int
    seeds: SeedRun
    round: int = 0
    spec: LoraSpec | None = None  # decoded: the fleet's adapter the seeds move (its layout)

    @property
    def from_version(self) -> int:
        return self.version - 1

    def encode(self, fleet: Fleet) -> bytes:
        header = fleet.header(
            "adapter",
            "server",
            "seeds",
            round=self.round,
            version=self.version,
            metrics={"from_version": self.from_version, **self.seeds.meta()},
        )
        return codec.encode(header, self.seeds.body())

    @classmethod
    def decode(cls, payload: bytes, fleet: Fleet) -> GlobalSeeds:
        header, body = fleet.open(payload, "adapter")
        if header.encoding != "seeds":
            raise PayloadError(f"a seeds adapter was expected, got {header.encoding}")
        start = integer(header.metrics.get("from_version"), "from_version")
        if header.version != start + 1:
            raise PayloadError(f"seeds of v{header.version} must start from v{header.version - 1}")
        seeds = SeedRun.from_body(header.metrics, body)
        return cls(header.version, seeds, header.round, fleet.spec_of(header))


def decode_global(payload: bytes, fleet: Fleet) -> GlobalAdapter | GlobalSeeds:
    """Whichever of the two global adapter forms ``payload`` is."""
    header, _ = codec.decode(payload)
    if header.encoding == "seeds":
        return GlobalSeeds.decode(payload, fleet)
    return GlobalAdapter.decode(payload, fleet)


@dataclass(frozen=True)
class PersonalAdapter:
    """The server's answer to a mixture upload (its sha256 is named, so a retained answer to an
    earlier upload is never taken): the personalized adapter, dense."""

    tensors: Tensors
    mixture_sha256: str = ""
    basis_version: int = 0
    cluster: int = 0
    version: int = 0
    local: bool = False  # a device's own mix, kept on disk before the server answered

    def encode(self, fleet: Fleet, encoding: str = "f16", sender: str = "server") -> bytes:
        metrics = {
            "mixture_sha256": self.mixture_sha256,
            "basis_version": self.basis_version,
            "cluster": self.cluster,
            "local_mix": self.local,
        }
        header = fleet.header("adapter", sender, encoding, version=self.version, metrics=metrics)
        return codec.encode(header, self.tensors)

    @classmethod
    def decode(cls, payload: bytes, fleet: Fleet) -> PersonalAdapter:
        header, tensors = fleet.open_dense(payload, "adapter")
        tensors = fleet.narrow(tensors)  # a window device's share of the fleet's adapter
        m = header.metrics
        sha = m.get("mixture_sha256", "")
        if not isinstance(sha, str) or len(sha) not in (0, 64):
            raise PayloadError("mixture_sha256 must be a 64-character digest")
        return cls(
            tensors,
            sha,
            integer(m.get("basis_version", 0), "basis_version"),
            integer(m.get("cluster", 0), "cluster"),
            header.version,
            bool(m.get("local_mix", False)),
        )


@dataclass(frozen=True)
class Basis:
    """K adapters (their B part, A being the shared init) the fleet offers for mixing."""

    version: int
    vectors: np.ndarray  # [K, n] float32: the BASIS_PART entries of each adapter, layout order
    spec: LoraSpec
    base_sha256: str
    prior: np.ndarray | None = None  # [K]: the coefficients devices start from (mean usage)

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    def check(self, spec: LoraSpec, base: BaseManifest) -> None:
        """Refuse a basis built for another base model or adapter layout, naming which."""
        if self.base_sha256 != base.sha256:
            raise ConfigError(
                f"basis v{self.version} is for base {self.base_sha256[:12]}, this device runs "
                f"{base.name} ({base.short_hash})"
            )
        if self.spec != spec:
            raise ConfigError(f"basis v{self.version} holds {self.spec} adapters, not {spec}")
        size = FlatLayout(spec, base).indices(BASIS_PART).size
        if self.vectors.ndim != 2 or self.vectors.shape[1] != size or self.k < 1:
            raise PayloadError(
                f"basis v{self.version} is {self.vectors.shape}, expected [K >= 1, {size}]"
            )
        if self.prior is not None and self.prior.shape != (self.k,):
            raise PayloadError(f"basis prior has shape {self.prior.shape}, expected ({self.k},)")

    def with_prior(self, prior: np.ndarray | None) -> Basis:
        return Basis(self.version, self.vectors, self.spec, self.base_sha256, prior)

    def encode(self, round_: int = 0, encoding: str = "q8") -> bytes:
        """The basis as an envelope (kind "basis"); q8 keeps K = 8 near 1.5 MB."""
        header = codec.Header(
            kind="basis",
            sender="server",
            round=round_,
            base_sha256=self.base_sha256,
            adapter=self.spec.to_dict(),
            encoding=encoding,
            version=self.version,
            metrics={
                "part": BASIS_PART,
                "prior": None if self.prior is None else [float(p) for p in self.prior],
            },
        )
        return codec.encode(header, {"basis": self.vectors})

    @classmethod
    def decode(cls, payload: bytes) -> Basis:
        """Parse a basis envelope; anything malformed is a ``PayloadError`` saying what."""
        header, tensors = codec.decode(payload)
        if header.kind != "basis" or set(tensors) != {"basis"}:
            raise PayloadError(f"expected a basis envelope, got kind {header.kind!r}")
        if header.metrics.get("part") != BASIS_PART:
            raise PayloadError(f"basis spans {header.metrics.get('part')!r}, not {BASIS_PART!r}")
        prior = header.metrics.get("prior")
        if prior is not None:
            if not isinstance(prior, list) or len(prior) != tensors["basis"].shape[0]:
                raise PayloadError("basis prior must be one number per basis adapter")
            prior = check_coef(np.array([number(p, "basis prior") for p in prior]), "basis prior")
        return cls(
            header.version,
            tensors["basis"],
            LoraSpec.from_dict(header.adapter),
            header.base_sha256,
            prior,
        )

    def start(self, groups: int) -> np.ndarray:
        """Initial coefficients [K, G]: the prior, or the plain average of the basis."""
        prior = self.prior if self.prior is not None else np.full(self.k, 1.0 / self.k)
        return np.repeat(np.asarray(prior, np.float32)[:, None], groups, axis=1)


@dataclass(frozen=True)
class Prior:
    """The coefficients new devices start from for basis ``version``: a few bytes on their own
    retained topic, so the basis is not pushed again after every mixture."""

    version: int
    prior: np.ndarray
    devices: int = 0

    def encode(self) -> bytes:
        body = {"version": self.version, "prior": self.prior.tolist(), "devices": self.devices}
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Prior:
        body = read_json(payload, "basis prior")
        raw = body.get("prior")
        if not isinstance(raw, list) or not raw or len(raw) > 4096:
            raise PayloadError("basis prior must be a non-empty list of coefficients")
        prior = check_coef(np.array([number(p, "basis prior") for p in raw]), "basis prior")
        return cls(
            integer(body.get("version"), "basis prior version"),
            prior,
            integer(body.get("devices", 0), "basis prior devices"),
        )


# -- secure aggregation (edge_sdk/secagg.py) -------------------------------------------------------
def hex_key(value: object, what: str) -> str:
    """A 32-byte key as 64 lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 64:
        raise PayloadError(f"{what} must be 64 hex digits")
    try:
        bytes.fromhex(value)
    except ValueError as err:
        raise PayloadError(f"{what} must be 64 hex digits") from err
    return value.lower()


def device_ids(value: object, what: str, limit: int = MAX_COHORT) -> list[str]:
    if not isinstance(value, list) or len(value) > limit:
        raise PayloadError(f"{what} must be a list of at most {limit} device ids")
    try:
        return [check_id("device", v) for v in value]
    except ConfigError as err:
        raise PayloadError(f"{what}: {err}") from err


@dataclass(frozen=True)
class SecAggRound:
    """A secure-aggregation round, in its announcement: the cohort (device id -> masking key)
    and the fixed point every member encodes its update in."""

    cohort: dict[str, str]
    bound: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"cohort": self.cohort, "bound": self.bound, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: object) -> SecAggRound:
        if not isinstance(data, dict) or not isinstance(data.get("cohort"), dict):
            raise PayloadError("a secure-aggregation round needs a cohort object")
        cohort = data["cohort"]
        ids = device_ids(list(cohort), "secure-aggregation cohort")
        if len(ids) < 2:
            raise PayloadError("a secure-aggregation cohort needs two devices at least")
        keys = {i: hex_key(cohort[i], f"masking key of {i}") for i in ids}
        out = cls(
            keys,
            number(data.get("bound"), "secagg bound", 1e-9, 1e9),
            number(data.get("scale"), "secagg scale", 1e-9, 1e12),
        )
        try:
            check_range(len(ids), out.bound, out.scale)
        except ConfigError as err:
            raise PayloadError(str(err)) from err
        return out

    def publics(self) -> dict[str, bytes]:
        return {device: bytes.fromhex(key) for device, key in self.cohort.items()}


@dataclass(frozen=True)
class Unmask:
    """The server to a secure-aggregation round's survivors: these devices masked but never
    uploaded; reveal your pair seeds with them."""

    round: int
    dropped: tuple[str, ...]

    def encode(self) -> bytes:
        return json.dumps({"round": self.round, "dropped": list(self.dropped)}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Unmask:
        body = read_json(payload, "unmask request")
        dropped = device_ids(body.get("dropped"), "unmask request dropped")
        return cls(integer(body.get("round"), "unmask request round"), tuple(dropped))


@dataclass(frozen=True)
class Reveal:
    """A survivor's pair seeds with the round's dropped devices (hex), and nothing else."""

    sender: str
    round: int
    seeds: dict[str, str]

    def encode(self) -> bytes:
        body = {"sender": self.sender, "round": self.round, "seeds": self.seeds}
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Reveal:
        body = read_json(payload, "reveal")
        seeds = body.get("seeds")
        if not isinstance(seeds, dict):
            raise PayloadError("a reveal holds an object of pair seeds")
        ids = device_ids(list(seeds), "reveal seeds")
        sender = device_ids([body.get("sender")], "reveal sender")[0]
        return cls(
            sender,
            integer(body.get("round"), "reveal round"),
            {i: hex_key(seeds[i], f"pair seed with {i}") for i in ids},
        )
