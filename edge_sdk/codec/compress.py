"""Tensor encodings for the wire: ``f32`` (exact), ``f16`` (half the bytes), ``q8`` (about a
quarter: int8 in blocks of 64 values, each block with one fp32 absmax scale, like GGML's Q8_0)."""

from __future__ import annotations

import numpy as np

from fleetune.edge_sdk.errors import PayloadError

Tensors = dict[str, np.ndarray]
ENCODINGS = ("f32", "f16", "q8", "seeds")
SEED_KEYS = ("seed_index", "coef")  # a zeroth-order run: int32 seed indices, float32 coefficients
_SCALE = ".q8scale"
BLOCK = 64


def _blocks(v: np.ndarray) -> np.ndarray:
    flat = v.astype(np.float32).reshape(-1)
    pad = (-flat.size) % BLOCK
    return np.pad(flat, (0, pad)).reshape(-1, BLOCK)


def encode_tensors(tensors: Tensors, encoding: str) -> Tensors:
    """Return the tensors to put in the safetensors body for ``encoding``."""
    if encoding == "f32":
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    if encoding == "f16":
        out: Tensors = {}
        for k, v in tensors.items():
            if np.abs(v).max(initial=0.0) > 65504.0:
                raise PayloadError(f"tensor {k} exceeds the f16 range; use f32")
            out[k] = v.astype(np.float16)
        return out
    if encoding == "q8":
        out = {}
        for k, v in tensors.items():
            blocks = _blocks(v)
            scale = np.abs(blocks).max(axis=1) / 127.0
            safe = np.where(scale > 0, scale, 1.0)
            q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
            out[k] = q.reshape(-1)[: v.size].reshape(v.shape)
            out[k + _SCALE] = scale.astype(np.float32)
        return out
    if encoding == "seeds":
        _check_seeds(tensors)
        return {
            "seed_index": tensors["seed_index"].astype(np.int32),
            "coef": tensors["coef"].astype(np.float32),
        }
    raise PayloadError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def _check_seeds(tensors: Tensors) -> None:
    if set(tensors) != set(SEED_KEYS):
        raise PayloadError(f"a seeds body holds exactly {SEED_KEYS}, got {sorted(tensors)}")
    index, coef = tensors["seed_index"], tensors["coef"]
    if index.ndim != 1 or coef.shape != index.shape:
        raise PayloadError(f"seed_index {index.shape} and coef {coef.shape} must be equal 1-D")
    if index.size and (index.min() < 0 or not np.issubdtype(index.dtype, np.integer)):
        raise PayloadError("seed_index must hold non-negative integers")


def decode_tensors(body: Tensors, encoding: str) -> Tensors:
    """Invert :func:`encode_tensors`, checking dtypes so a mislabelled body is refused."""
    expected = {"f32": np.float32, "f16": np.float16, "q8": np.int8}
    if encoding == "seeds":
        if (
            body.get("seed_index", np.zeros(0, np.int32)).dtype != np.int32
            or body.get("coef", np.zeros(0, np.float32)).dtype != np.float32
        ):
            raise PayloadError("a seeds body needs int32 seed_index and float32 coef")
        _check_seeds(body)
        return dict(body)
    if encoding not in expected:
        raise PayloadError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    out: Tensors = {}
    for k, v in body.items():
        if encoding == "q8" and k.endswith(_SCALE):
            continue
        if v.dtype != expected[encoding]:
            raise PayloadError(f"tensor {k} is {v.dtype}, but the header says {encoding}")
        if encoding == "q8":
            scale = body.get(k + _SCALE)
            if scale is None or scale.shape != (-(-v.size // BLOCK),):
                raise PayloadError(f"tensor {k} lacks a valid q8 scale")
            blocks = _blocks(v) * scale[:, None]
            out[k] = blocks.reshape(-1)[: v.size].reshape(v.shape)
        else:
            out[k] = v.astype(np.float32)
    return out
