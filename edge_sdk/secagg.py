"""Secure aggregation by pairwise additive masks: the server learns the sum of a round's updates
and nothing else about any one of them (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, in its pairwise-mask core).

Every device holds an X25519 key; for each pair (i, j) of a round's cohort both sides derive
the same 32-byte seed (X25519, then HKDF-SHA256 bound to the fleet and round) and from it the
same mask, a ChaCha20 keystream read as uint32. Updates go to fixed point (clipped to
``±bound``, times ``scale``, as integers mod 2**32); device i adds the mask of every pair with
a larger id and subtracts it for a smaller one, so the masks cancel in the sum mod 2**32 and
nothing else does. A device that masked but never uploaded leaves its pairs' masks in the sum;
each survivor then reveals only its seed with that device (:func:`pair_seed`) and the server
removes them (:func:`unmask_sum`).

What this core does not do (the protocol's full version does): Shamir-share each device's key,
so that the survivors need not be online for recovery, and double-mask, so that a dropped
device's late upload reveals nothing; here, an update from a device declared dropped is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetune.edge_sdk.errors import ConfigError, PayloadError

MODULUS_BITS = 32


class MaskingKey:
    """A device's X25519 key for pairwise masks (not its TLS key, not the fleet's signing key)."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def to_bytes(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MaskingKey:
        return cls(X25519PrivateKey.from_private_bytes(raw))


def pair_seed(key: MaskingKey, peer_public: bytes, fleet: str, round_: int) -> bytes:
    """The seed device and peer share for ``round_`` (either side computes the same)."""
    try:
        shared = key.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise PayloadError(f"a masking key is not a valid X25519 public key: {err}") from err
    info = f"fleetune-secagg|{fleet}|{round_}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint32 words of ChaCha20 keystream under ``seed``."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(stream.update(b"\0" * (4 * size)), dtype="<u4").astype(np.uint32)


def check_range(devices: int, bound: float, scale: float) -> None:
    """The sum of ``devices`` fixed-point updates must fit a signed 32-bit integer."""
    if bound <= 0 or scale <= 0 or devices * math.ceil(bound * scale) >= 2 ** (MODULUS_BITS - 1):
        raise ConfigError(
            f"secure aggregation of {devices} updates within ±{bound} at scale {scale} overflows "
            f"{MODULUS_BITS}-bit integers: lower the scale or the bound"
        )


def masked_update(
    flat: np.ndarray,
    me: str,
    key: MaskingKey,
    cohort: Mapping[str, bytes],
    fleet: str,
    round_: int,
    bound: float,
    scale: float,
) -> np.ndarray:
    """Device ``me``'s update ``flat`` in fixed point plus its pairwise masks with every other
    member of ``cohort`` (device id -> masking public key), as uint32."""
    check_range(len(cohort), bound, scale)
    if me not in cohort:
        raise ConfigError(f"{me} is not in the round's secure-aggregation cohort")
    q = np.rint(np.clip(flat, -bound, bound) * scale).astype(np.int64)
    out = q.astype(np.uint32)  # two's complement, mod 2**32
    for peer, public in sorted(cohort.items()):
        if peer == me:
            continue
        m = mask(pair_seed(key, public, fleet, round_), flat.size)
        out = out + m if me < peer else out - m  # uint32 arithmetic wraps mod 2**32
    return out


def unmask_sum(
    masked: Mapping[str, np.ndarray],
    revealed: Iterable[tuple[str, str, bytes]] = (),
    scale: float = 1.0,
) -> np.ndarray:
    """The float sum of the survivors' updates: their masked vectors summed mod 2**32, minus
    the masks they share with dropped devices (``revealed``: (survivor, dropped, pair seed))."""
    if not masked:
        raise PayloadError("secure aggregation needs at least one masked update")
    sizes = {v.shape for v in masked.values()}
    if len(sizes) != 1 or any(v.dtype != np.uint32 for v in masked.values()):
        raise PayloadError("masked updates must be uint32 vectors of one size")
    total = np.zeros(next(iter(sizes)), np.uint32)
    for value in masked.values():
        total += value
    for survivor, dropped, seed in revealed:
        if survivor not in masked or dropped in masked:
            raise PayloadError(f"{survivor} cannot reveal a mask with {dropped}")
        m = mask(seed, total.size)
        total = total - m if survivor < dropped else total + m
    return total.view(np.int32).astype(np.float64) / scale
