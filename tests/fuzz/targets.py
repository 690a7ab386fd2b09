"""What a hostile peer can send to a fleetune process, as fuzz targets: every wire decoder, the
server's whole update check, and the device's signature check. Each must give a message or a
``PayloadError`` (the server's update check: any ``FleetuneError``, which its round loop
refuses), never another exception. ``make test`` runs them on hypothesis's inputs
(tests/unit/test_protocol.py); ``make fuzz`` under atheris (tests/fuzz/run.py), coverage-guided,
starting from the valid messages below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.codec.envelope import MAGIC
from fleetune.edge_sdk.errors import FleetuneError, PayloadError
from fleetune.edge_sdk.protocol import (
    BASIS_PART,
    Announcement,
    Basis,
    DeviceStatus,
    Fleet,
    GlobalAdapter,
    GlobalSeeds,
    MixtureUpload,
    PersonalAdapter,
    Prior,
    Reveal,
    SecAggRound,
    SeedPool,
    SeedRun,
    Unmask,
    Update,
    decode_global,
)
from fleetune.edge_sdk.signing import Keyring, Signer
from fleetune.server.validation import check_update
from tests.conftest import tiny_manifest

SPEC = LoraSpec(r=2)
BASE = tiny_manifest()
FLEET = Fleet(BASE, SPEC)
SIGNER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def _adapter(value: float = 0.01) -> dict:
    return {k: v + value for k, v in init_lora(SPEC, BASE).items()}


def _seeds() -> SeedRun:
    return SeedRun.from_pairs([(3, 0.01), (5, -0.02), (3, 0.005)], pool_seed=77)


def _basis() -> Basis:
    size = FlatLayout(SPEC, BASE).indices(BASIS_PART).size
    vectors = np.random.default_rng(0).normal(0, 0.1, (3, size)).astype(np.float32)
    return Basis(2, vectors, SPEC, BASE.sha256, np.array([0.2, 0.3, 0.5], np.float32))


# one valid payload per envelope message, and its decoder
ENVELOPES = {
    "update": (
        lambda: Update("d1", 2, 1, 10, delta=_adapter(), metrics={"steps": 3}).encode(FLEET),
        lambda p: Update.decode(p, FLEET),
    ),
    "update-topk": (
        lambda: Update("d1", 2, 1, 10, delta=_adapter()).encode(FLEET, "topk:0.1+sq4"),
        lambda p: Update.decode(p, FLEET),
    ),
    "update-q4": (
        lambda: Update("d1", 2, 1, 10, delta=_adapter()).encode(FLEET, "q4"),
        lambda p: Update.decode(p, FLEET),
    ),
    "update-q1": (
        lambda: Update("d1", 2, 1, 10, delta=_adapter()).encode(FLEET, "q1"),
        lambda p: Update.decode(p, FLEET),
    ),
    "update-shared-a": (
        lambda: Update("d1", 2, 1, 10, delta=_adapter(), part="lora_a").encode(FLEET),
        lambda p: Update.decode(p, FLEET),
    ),
    "update-seeds": (
        lambda: Update("d1", 2, 1, 10, seeds=_seeds()).encode(FLEET),
        lambda p: Update.decode(p, FLEET),
    ),
    "global": (
        lambda: GlobalAdapter(3, _adapter(), round=2).encode(FLEET),
        lambda p: decode_global(p, FLEET),
    ),
    "global-seeds": (
        lambda: GlobalSeeds(4, _seeds(), round=3).encode(FLEET),
        lambda p: decode_global(p, FLEET),
    ),
    "personal": (
        lambda: PersonalAdapter(_adapter(), "ab" * 32, 2, 1).encode(FLEET),
        lambda p: PersonalAdapter.decode(p, FLEET),
    ),
    "mixture": (
        lambda: MixtureUpload(
            "d1", 2, np.full((3, 1), 0.3), 8, 3.2, {"steps": 4}, _seeds(), 4096
        ).encode(FLEET),
        lambda p: MixtureUpload.decode(p, FLEET),
    ),
    "basis": (lambda: _basis().encode(encoding="f32"), Basis.decode),
}
JSON_DECODERS = {
    "announcement": Announcement.decode,
    "prior": Prior.decode,
    "status": DeviceStatus.decode,
    "announcement-secagg": Announcement.decode,
    "unmask": Unmask.decode,
    "reveal": Reveal.decode,
}
ALL_DECODERS = {
    **{name: decode for name, (_, decode) in ENVELOPES.items()},
    **JSON_DECODERS,
}


def _framed(head: bytes, body: bytes) -> bytes:
    """An envelope around ``head`` (header JSON) and ``body`` (safetensors) whose body hash
    and sizes are right, so that mutations reach past the integrity checks."""
    try:
        meta = json.loads(head)
    except (ValueError, RecursionError):
        meta = None
    if isinstance(meta, dict):
        meta.update(payload_sha256=hashlib.sha256(body).hexdigest(), payload_bytes=len(body))
        head = json.dumps(meta).encode()
    return struct.pack(">4sBI", MAGIC, codec.SCHEMA_VERSION, len(head)) + head + body


def _split(payload: bytes) -> tuple[bytes, bytes]:
    """A valid update's header JSON and body."""
    (size,) = struct.unpack_from(">I", payload, 5)
    return payload[9 : 9 + size], payload[9 + size :]


def _update_header(head: bytes) -> None:
    """Any header JSON over a valid update's body."""
    Update.decode(_framed(head, _split(ENVELOPES["update"][0]())[1]), FLEET)


def _update_body(body: bytes, envelope: str = "update") -> None:
    """Any body under a valid update's header (``envelope``: which one's)."""
    Update.decode(_framed(_split(ENVELOPES[envelope][0]())[0], body), FLEET)


def _server_check(payload: bytes) -> None:
    """The server's whole check of an update for round 2 from v1 (``FleetuneError`` refuses)."""
    try:
        check_update(payload, "d1", FLEET, 2, 1, lambda r: SeedPool(77, 4096), set())
    except FleetuneError as err:
        raise PayloadError(str(err)) from err


def _device_open(payload: bytes) -> None:
    """A device that pinned the fleet's key: a key list, then any signed push."""
    keyring = Keyring([SIGNER.public])
    keyring.rotate(payload)
    keyring.open(payload, "push")


TARGETS: dict[str, Callable[[bytes], object]] = {
    **ALL_DECODERS,
    "update-header": _update_header,
    "update-body": _update_body,
    "update-topk-body": lambda body: _update_body(body, "update-topk"),
    "server-check": _server_check,
    "device-open": _device_open,
}
SEEDS: dict[str, Callable[[], bytes]] = {
    **{name: make for name, (make, _) in ENVELOPES.items()},
    "announcement": lambda: Announcement(
        round=2,
        adapter_version=1,
        base_sha256=BASE.sha256,
        adapter=SPEC.to_dict(),
        zo=SeedPool(77, 4096),
    ).encode(),
    "announcement-secagg": lambda: Announcement(
        round=2,
        adapter_version=1,
        secagg=SecAggRound({"a": "ab" * 32, "b": "cd" * 32}, 1.0, 2.0**20),
    ).encode(),
    "unmask": lambda: Unmask(3, ("c",)).encode(),
    "reveal": lambda: Reveal("a", 3, {"c": "ef" * 32}).encode(),
    "prior": lambda: Prior(2, np.array([0.2, 0.3, 0.5], np.float32), 3).encode(),
    "status": lambda: DeviceStatus("online", "adapter/global: bad signature").encode(),
    "update-header": lambda: _split(ENVELOPES["update"][0]())[0],
    "update-body": lambda: _split(ENVELOPES["update"][0]())[1],
    "update-topk-body": lambda: _split(ENVELOPES["update-topk"][0]())[1],
    "server-check": ENVELOPES["update"][0],
    "device-open": lambda: SIGNER.key_list([SIGNER.public], 1),
}


def valid_or_payload_error(name: str, payload: bytes) -> None:
    """Run target ``name``; a ``PayloadError`` is a refusal, anything else escapes."""
    with contextlib.suppress(PayloadError):
        TARGETS[name](payload)
