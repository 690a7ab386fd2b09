"""The versioned wire envelope for updates and adapters.

Layout::

    b"FLTN" | u8 schema | u32 big-endian header length | JSON header (UTF-8) | safetensors body

The header says who sent what for which base model; ``payload_sha256`` covers the body, so a
truncated or altered message is refused. Sizes are bounded before anything is parsed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fleetune.edge_sdk.codec.compress import (
    Tensors,
    decode_tensors,
    encode_tensors,
    parse_encoding,
)
from fleetune.edge_sdk.errors import PayloadError

MAGIC = b"FLTN"
SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KINDS = ("update", "adapter", "basis", "mixture")
_PREFIX = struct.Struct(">4sBI")


@dataclass(frozen=True)
class Header:
    """What an envelope carries besides its tensors."""

    kind: str  # "update" (a device's delta), "adapter" (full weights from the server),
    # "basis" (K adapters to mix, from the server), "mixture" (a device's coefficients)
    sender: str  # device id, or "server"
    round: int  # the round this belongs to
    base_sha256: str  # the base model it is for
    adapter: dict  # the adapter spec (LoraSpec.to_dict())
    encoding: str  # codec/compress.py: f32 | f16 | q8 | q4 | sq8 | sq4 | seeds | topk:F+VALUE
    num_examples: int = 0  # training windows behind an update (FedAvg weight)
    version: int = 0  # adapter version (for kind "adapter")
    metrics: dict = field(default_factory=dict)  # small numbers: losses, steps, seconds

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PayloadError(f"header kind {self.kind!r} is not one of {KINDS}")
        parse_encoding(self.encoding)  # an unknown codec is refused by name
        for name in ("round", "num_examples", "version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise PayloadError(
                    f"header {name} must be an integer in 0..2**63-1, got {value!r:.40}"
                )
        if not isinstance(self.sender, str) or not self.sender:
            raise PayloadError("header sender must be a non-empty string")
        if not isinstance(self.base_sha256, str) or len(self.base_sha256) != 64:
            raise PayloadError("header base_sha256 must be a 64-character hex digest")
        if not isinstance(self.adapter, dict) or not isinstance(self.metrics, dict):
            raise PayloadError("header adapter and metrics must be objects")


def encode(header: Header, tensors: Tensors, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialize ``tensors`` (float32 arrays) under ``header``."""
    body = st_save(encode_tensors(tensors, header.encoding))
    meta = {
        "schema": SCHEMA_VERSION,
        **header.__dict__,
        "payload_sha256": hashlib.sha256(body).hexdigest(),
        "payload_bytes": len(body),
    }
    head = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise PayloadError(f"header is {len(head)} bytes, over the {MAX_HEADER_BYTES} limit")
    data = _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(head)) + head + body
    if len(data) > max_bytes:
        raise PayloadError(f"message is {len(data)} bytes, over the {max_bytes} limit")
    return data


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Header, Tensors]:
    """Parse and verify an envelope; every failure is a ``PayloadError`` that says what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadError(f"message is {len(data)} bytes, over the {max_bytes} limit")
    if len(data) < _PREFIX.size:
        raise PayloadError(f"message is {len(data)} bytes, too short for an envelope")
    magic, schema, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"not a fleetune envelope (magic {magic!r})")
    if schema != SCHEMA_VERSION:
        raise PayloadError(
            f"envelope schema {schema} is not supported (this SDK reads {SCHEMA_VERSION})"
        )
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(data):
        raise PayloadError(f"header length {head_len} is out of bounds")
    try:
        meta = json.loads(data[_PREFIX.size : _PREFIX.size + head_len])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # nesting: RecursionError
        raise PayloadError(f"header is not valid JSON: {str(err)[:200]}") from err
    if not isinstance(meta, dict):
        raise PayloadError("header is not a JSON object")
    body = data[_PREFIX.size + head_len :]
    if meta.get("payload_bytes") != len(body):
        raise PayloadError(f"body is {len(body)} bytes, header says {meta.get('payload_bytes')}")
    if meta.get("payload_sha256") != hashlib.sha256(body).hexdigest():
        raise PayloadError("body sha256 does not match the header (corrupted or tampered)")
    fields = {k: meta[k] for k in Header.__dataclass_fields__ if k in meta}
    try:
        header = Header(**fields)
    except TypeError as err:
        raise PayloadError(f"header lacks a field: {err}") from err
    try:
        raw = st_load(body)
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise PayloadError(f"body is not valid safetensors: {str(err)[:200]}") from err
    tensors = decode_tensors(raw, header.encoding)
    for name, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise PayloadError(f"tensor {name} contains NaN or Inf")
    return header, tensors
