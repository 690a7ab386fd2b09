"""Signed pushes: everything the server publishes is signed with the fleet's Ed25519 key, and a
device that pinned the fleet's public key verifies before it uses anything.

Wire: ``b"FLTS" | u8 version | 32-byte public key | 64-byte signature | message``, the signature
over ``b"FLTS" | version | public key | message``. A device holds a :class:`Keyring` of trusted
public keys: the one it pinned (``[sync] fleet_key``), then whatever a validly signed key list on
the retained ``keys`` topic names, which is how the server rotates its key without touching a
device (sign the new list with the old key; the old key leaves the list once devices have it).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetune.edge_sdk.errors import ConfigError, PayloadError

MAGIC = b"FLTS"
VERSION = 1
_HEAD = struct.Struct(">4sB32s64s")


def is_signed(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def parse_key(text: str) -> bytes:
    """A public key as 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as err:
        raise ConfigError(f"fleet key {text[:20]!r}... is not hex: {err}") from err
    if len(key) != 32:
        raise ConfigError(f"a fleet key is 32 bytes (64 hex digits), got {len(key)}")
    return key


class Signer:
    """The server's signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def load_or_create(cls, path: str | Path) -> Signer:
        """The PEM key at ``path``, created (owner-only) if it does not exist."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{path} is not a PEM private key: {err}") from err
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return cls(key)

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def sign(self, message: bytes) -> bytes:
        head = MAGIC + bytes([VERSION]) + self.public
        return head + self._key.sign(head + message) + message

    def key_list(self, keys: list[bytes], version: int) -> bytes:
        """The signed list of trusted keys (the ``keys`` topic)."""
        body = {"version": version, "keys": [k.hex() for k in keys]}
        return self.sign(json.dumps(body).encode())


class Keyring:
    """The public keys a device trusts; verifies and unwraps signed messages."""

    def __init__(self, keys: list[bytes], version: int = 0) -> None:
        if not keys:
            raise ConfigError("a keyring needs at least one trusted key")
        self.keys, self.version = set(keys), version

    def open(self, payload: bytes, what: str) -> bytes:
        """The message inside a signed ``payload``; ``PayloadError`` if it is unsigned, signed
        by an untrusted key or tampered with."""
        if not is_signed(payload):
            raise PayloadError(f"{what} is not signed, and this device requires the fleet's key")
        if len(payload) < _HEAD.size:
            raise PayloadError(f"signed {what} is {len(payload)} bytes, too short")
        _, version, public, signature = _HEAD.unpack_from(payload)
        if version != VERSION:
            raise PayloadError(f"signed {what}: signature version {version} is not {VERSION}")
        if public not in self.keys:
            raise PayloadError(f"{what} is signed by key {public.hex()[:16]}…, not a fleet key")
        message = payload[_HEAD.size :]
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(
                signature, payload[: _HEAD.size - 64] + message
            )
        except InvalidSignature as err:
            raise PayloadError(f"{what}: bad signature (tampered or corrupted)") from err
        return message

    def rotate(self, payload: bytes) -> bool:
        """Adopt a signed key list that is newer than the one held; False if it is not (the
        retained list comes back on every connection, signed by a key it may have retired)."""
        if _list_version(payload) <= self.version:
            return False
        body = self.open(payload, "key list")
        try:
            data = json.loads(body)
            version = data["version"]
            keys = [parse_key(k) for k in data["keys"]]
        except (ValueError, KeyError, TypeError, RecursionError) as err:  # ConfigError: ValueError
            raise PayloadError(f"key list is not {{version, keys}} JSON: {err}") from err
        if not isinstance(version, int) or isinstance(version, bool) or not keys:
            raise PayloadError("key list needs an integer version and at least one key")
        self.keys, self.version = set(keys), version
        return True


def _list_version(payload: bytes) -> int:
    """The version a key list claims, read before verifying (only to skip old ones)."""
    try:
        version = json.loads(payload[_HEAD.size :]).get("version")
    except (ValueError, AttributeError, RecursionError):
        return 2**63
    return version if isinstance(version, int) and not isinstance(version, bool) else 2**63


def unwrap(payload: bytes, keyring: Keyring | None, what: str) -> bytes:
    """Verify with ``keyring`` when the device pinned the fleet's key; otherwise take the message
    as it is (a signed one without checking, as a device without a key cannot)."""
    if keyring is not None:
        return keyring.open(payload, what)
    return payload[_HEAD.size :] if is_signed(payload) else payload
