"""Tensor encodings for the wire: ``f32`` (exact), ``f16`` (half the bytes), ``q8`` (a quarter:
int8 per row with one fp32 absmax scale per row)."""

from __future__ import annotations

import numpy as np

from edge_sdk.errors import PayloadError

Tensors = dict[str, np.ndarray]
ENCODINGS = ("f32", "f16", "q8")
_SCALE = ".q8scale"


def encode_tensors(tensors: Tensors, encoding: str) -> Tensors:
    """Return the tensors to put in the safetensors body for ``encoding``."""
    if encoding == "f32":
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    if encoding == "f16":
        out = {}
        for k, v in tensors.items():
            if np.abs(v).max(initial=0.0) > 65504.0:
                raise PayloadError(f"tensor {k} exceeds the f16 range; use f32")
            out[k] = v.astype(np.float16)
        return out
    if encoding == "q8":
        out = {}
        for k, v in tensors.items():
            rows = v.reshape(v.shape[0], -1).astype(np.float32) if v.ndim else v.reshape(1, 1)
            scale = np.abs(rows).max(axis=1) / 127.0
            safe = np.where(scale > 0, scale, 1.0)
            out[k] = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8).reshape(v.shape)
            out[k + _SCALE] = scale.astype(np.float32)
        return out
    raise PayloadError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_tensors(body: Tensors, encoding: str) -> Tensors:
    """Invert :func:`encode_tensors`, checking dtypes so a mislabelled body is refused."""
    expected = {"f32": np.float32, "f16": np.float16, "q8": np.int8}
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
            if scale is None or scale.shape != (v.shape[0] if v.ndim else 1,):
                raise PayloadError(f"tensor {k} lacks a valid q8 scale")
            rows = v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1)
            out[k] = (rows.astype(np.float32) * scale[:, None]).reshape(v.shape)
        else:
            out[k] = v.astype(np.float32)
    return out
