"""Tensor encodings for the wire, named in the envelope and composable as ``[topk:F+]VALUE``.
Long because each decoder checks its body field by field, next to the encoder it inverts.

VALUE   ``f32`` exact; ``f16`` half the bytes; ``q8`` / ``q4``: int8 / int4 in blocks of 64 / 32
        values, each block with one fp32 absmax scale (GGML's Q8_0 / Q4_0 layout), rounded to
        nearest; ``sq8`` / ``sq4``: the same with stochastic rounding, unbiased (the expected
        decoded value is the value: what averaging over a fleet wants; QSGD, Alistarh et al.,
        NeurIPS 2017); ``q1``: one sign bit per value and, per block of 128, the block's mean
        magnitude as the fp32 scale (the L2-best scale for signs; 1.25 bits a value, 25x
        below f32): biased and coarse alone, meant with error feedback, which carries what it
        rounds away into the next update (EF-SignSGD: Karimireddy et al., ICML 2019). All
        tensors go in one flat body, with the layout as in top-k: per-tensor entries would
        cost as much as the bits.
topk:F  keep the fraction F (0 < F <= 1) of each tensor's entries with the largest magnitude,
        encoded by VALUE; the rest decode as zero. All tensors share one body: the kept values,
        their positions in the concatenation as LEB128 gaps (one byte each at 5% density), and
        the names and shapes (zlib JSON). What top-k drops, a device carries into its next
        update (``edge_sdk/codec/feedback.py``).
seeds   a zeroth-order run: int32 seed indices and float32 coefficients.
secagg  one uint32 vector ``masked``: a securely aggregated update (``edge_sdk/secagg.py``).

Every body is checked against its encoding before it is decoded: dtypes, lengths, index ranges
and declared shapes (bounded), so a hostile body is a ``PayloadError``, never a crash.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np

from fleetune.edge_sdk.errors import PayloadError

Tensors = dict[str, np.ndarray]
VALUES = ("f32", "f16", "q8", "q4", "sq8", "sq4", "q1")
ENCODINGS = (*VALUES, "seeds", "secagg")  # plain names; any VALUE may also follow "topk:F+"
SEED_KEYS = ("seed_index", "coef")  # a zeroth-order run: int32 seed indices, float32 coefficients
BLOCKS = {"q8": 64, "q4": 32, "q1": 128}
LEVELS = {"q8": 127, "q4": 7}
MAX_ELEMENTS = 1 << 27  # entries one tensor may declare (512 MB of float32)
_Q8, _Q4, _Q4LEN = ".q8scale", ".q4scale", ".q4len"
_Q1, _Q1LEN = ".q1scale", ".q1len"
_SHAPE = ".shape"
_EXTRA = (_Q8, _Q4, _Q4LEN, _Q1, _Q1LEN, _SHAPE)
PACKED = ("q4", "q1")  # values packed below a byte: the tensor's shape travels beside them
_TOPK = re.compile(r"topk:(0\.\d{1,6}|1(\.0{1,6})?)\+(\w+)")


@dataclass(frozen=True)
class Encoding:
    """A parsed encoding name: the value codec and, for sparse updates, the kept fraction."""

    value: str
    topk: float | None = None

    @property
    def lossy(self) -> bool:
        return self.value not in ("f32", "seeds", "secagg") or self.topk is not None


def parse_encoding(name: object) -> Encoding:
    """``"q8"`` → Encoding("q8"); ``"topk:0.05+sq4"`` → Encoding("sq4", 0.05); anything else is a
    ``PayloadError`` that names it."""
    if isinstance(name, str) and name in ENCODINGS:
        return Encoding(name)
    match = _TOPK.fullmatch(name) if isinstance(name, str) and len(name) <= 40 else None
    if match is None or match.group(3) not in VALUES or float(match.group(1)) <= 0:
        raise PayloadError(
            f"unknown encoding {str(name)[:40]!r}: expected one of {ENCODINGS}, or topk:F+VALUE "
            f"with 0 < F <= 1 (six decimals at most) and VALUE one of {VALUES}"
        )
    return Encoding(match.group(3), float(match.group(1)))


# -- value codecs --------------------------------------------------------------------------------
def _blocks(flat: np.ndarray, size: int) -> np.ndarray:
    if flat.size % size:  # a partial last block, padded with zeros
        flat = np.pad(flat, (0, size - flat.size % size))
    return flat.reshape(-1, size)


def _quantize(v: np.ndarray, kind: str, rng: np.random.Generator | None) -> tuple:
    """Blocks of ``v`` as integers in ±LEVELS and one scale per block."""
    levels = LEVELS[kind]
    blocks = _blocks(np.asarray(v, np.float32).reshape(-1), BLOCKS[kind])
    scale = np.abs(blocks).max(axis=1) / levels
    x = blocks / np.where(scale > 0, scale, 1.0)[:, None]
    x = np.floor(x + rng.random(x.shape)) if rng is not None else np.rint(x)
    return np.clip(x, -levels, levels).astype(np.int8), scale.astype(np.float32)


def _encode_value(name: str, v: np.ndarray, codec: str, rng: np.random.Generator) -> Tensors:
    if codec == "f32":
        return {name: np.ascontiguousarray(v, dtype=np.float32)}
    if codec == "f16":
        if np.abs(v).max(initial=0.0) > 65504.0:
            raise PayloadError(f"tensor {name} exceeds the f16 range; use f32")
        return {name: v.astype(np.float16)}
    if codec == "q1":
        blocks = _blocks(np.asarray(v, np.float32).reshape(-1), BLOCKS["q1"])
        bits = np.packbits(blocks.reshape(-1)[: v.size] >= 0)
        scale = np.abs(blocks).sum(axis=1) / np.minimum(
            BLOCKS["q1"], v.size - BLOCKS["q1"] * np.arange(len(blocks))
        )
        return {
            name: bits,
            name + _Q1: scale.astype(np.float32),
            name + _Q1LEN: np.array([v.size], np.int64),
        }
    kind = codec.removeprefix("s")
    q, scale = _quantize(v, kind, rng if codec.startswith("s") else None)
    if kind == "q8":
        return {name: q.reshape(-1)[: v.size].reshape(v.shape), name + _Q8: scale}
    nibbles = (q.reshape(-1)[: v.size] + 8).astype(np.uint8)  # 1..15, two per byte
    packed = nibbles[0::2] | (np.pad(nibbles[1::2], (0, nibbles.size % 2)) << 4)
    return {name: packed, name + _Q4: scale, name + _Q4LEN: np.array([v.size], np.int64)}


def _decode_value(name: str, body: Tensors, codec: str) -> np.ndarray:
    """The float32 values of ``name`` (for q4: 1-D; for the others: the stored shape)."""
    v = body[name]
    kind = codec.removeprefix("s")
    expected = {"f32": np.float32, "f16": np.float16, "q8": np.int8, "q4": np.uint8, "q1": np.uint8}
    if v.dtype != expected[kind]:
        raise PayloadError(f"tensor {name} is {v.dtype}, but the header says {codec}")
    if kind == "q1":
        return _decode_q1(name, body)
    if kind in ("f32", "f16"):
        return v.astype(np.float32)
    scale = body.get(name + (_Q8 if kind == "q8" else _Q4))
    if kind == "q8":
        if scale is None or scale.dtype != np.float32 or scale.shape != (-(-v.size // 64),):
            raise PayloadError(f"tensor {name} lacks a valid q8 scale")
        if v.min(initial=0) < -LEVELS["q8"]:  # int8 holds -128, never above +127
            raise PayloadError(f"tensor {name} holds int8 values beyond ±127")
        flat = (_blocks(v.reshape(-1).astype(np.float32), 64) * scale[:, None]).reshape(-1)
        return flat[: v.size].reshape(v.shape)
    length = body.get(name + _Q4LEN)
    if v.ndim != 1 or length is None or length.dtype != np.int64 or length.shape != (1,):
        raise PayloadError(f"tensor {name} lacks a valid q4 length")
    n = int(length[0])
    if not 2 * v.size - 1 <= n <= 2 * v.size:
        raise PayloadError(f"tensor {name}: {v.size} bytes cannot hold {n} int4 values")
    if scale is None or scale.dtype != np.float32 or scale.shape != (-(-n // 32),):
        raise PayloadError(f"tensor {name} lacks a valid q4 scale")
    nibbles = np.empty(2 * v.size, np.int16)
    nibbles[0::2], nibbles[1::2] = v & 0x0F, v >> 4
    q = nibbles[:n] - 8
    if n and (q.min() < -LEVELS["q4"] or q.max() > LEVELS["q4"]):
        raise PayloadError(f"tensor {name} holds int4 values beyond ±7")
    return (_blocks(q.astype(np.float32), 32) * scale[:, None]).reshape(-1)[:n]


def _decode_q8_blocks(body: Tensors, names: list[str]) -> Tensors | None:
    """Every q8 tensor dequantized in one pass when each holds whole blocks with valid scales
    (LoRA shapes do): ``_decode_value``'s checks, vectorized (a server decodes thousands of
    these a round). ``None`` sends the body down the per-tensor path, which names a problem."""
    block = BLOCKS["q8"]
    values, scales = [body[n] for n in names], []
    for name, v in zip(names, values, strict=True):
        s = body.get(name + _Q8)
        if v.dtype != np.int8 or v.size % block or s is None or s.dtype != np.float32:
            return None
        if s.shape != (v.size // block,):
            return None
        scales.append(s)
    if not values:
        return None
    q = np.concatenate([v.reshape(-1) for v in values])
    if q.min() < -LEVELS["q8"]:
        return None
    blocks = q.astype(np.float32).reshape(-1, block)
    blocks *= np.concatenate(scales)[:, None]
    flat = blocks.reshape(-1)
    out, at = {}, 0
    for name, v in zip(names, values, strict=True):
        out[name] = flat[at : at + v.size].reshape(v.shape)
        at += v.size
    return out


def _decode_q1(name: str, body: Tensors) -> np.ndarray:
    """Signs times their block's scale, 1-D."""
    bits, scale, length = body[name], body.get(name + _Q1), body.get(name + _Q1LEN)
    if bits.ndim != 1 or length is None or length.dtype != np.int64 or length.shape != (1,):
        raise PayloadError(f"tensor {name} lacks a valid q1 length")
    n = int(length[0])
    if not 8 * bits.size - 7 <= n <= 8 * bits.size:
        raise PayloadError(f"tensor {name}: {bits.size} bytes cannot hold {n} sign bits")
    blocks = -(-n // BLOCKS["q1"])
    if scale is None or scale.dtype != np.float32 or scale.shape != (blocks,):
        raise PayloadError(f"tensor {name} lacks a valid q1 scale")
    signs = np.unpackbits(bits)[:n].astype(np.float32) * 2 - 1
    return signs * np.repeat(scale, BLOCKS["q1"])[:n]


# -- top-k -----------------------------------------------------------------------------------------
# One sparse body for all tensors: per-entry overhead (safetensors' header, one scale block per
# tensor) would otherwise cost more than the values at 5% density.
_VALUES, _GAPS, _LAYOUT = "topk.values", "topk.gaps", "topk.layout"
_FLAT = "flat.values"  # q1: every tensor in one body, laid out by _LAYOUT
MAX_LAYOUT_BYTES = 1 << 20  # the decompressed list of names and shapes


def varint(values: np.ndarray) -> np.ndarray:
    """Unsigned integers < 2**35 as LEB128 bytes (7 bits a byte, high bit: more follows)."""
    v = np.asarray(values, np.int64)
    length = np.ones(v.shape, np.int64)
    for j in range(1, 5):
        length += v >= 1 << (7 * j)
    starts = np.cumsum(length) - length
    out = np.zeros(int(length.sum()), np.uint8)
    for j in range(5):
        has = length > j
        more = np.where(length[has] > j + 1, 0x80, 0)
        out[starts[has] + j] = ((v[has] >> (7 * j)) & 0x7F) | more
    return out


def unvarint(data: np.ndarray) -> np.ndarray:
    """Invert :func:`varint`; refuses a value of over 5 bytes or a cut-off last one."""
    if data.size == 0:
        return np.zeros(0, np.int64)
    last = (data & 0x80) == 0
    if not last[-1]:
        raise PayloadError("top-k positions end in the middle of a number")
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    first = np.concatenate([[0], np.flatnonzero(last)[:-1] + 1])
    shift = np.arange(data.size) - first[group]
    if shift.max() > 4:
        raise PayloadError("a top-k position is longer than 5 bytes")
    out = np.zeros(int(last.sum()), np.int64)
    np.add.at(out, group, (data & 0x7F).astype(np.int64) << (7 * shift))
    return out


def _encode_topk(tensors: Tensors, enc: Encoding, rng: np.random.Generator) -> Tensors:
    """The fraction F of each tensor's entries, largest magnitude first, as one flat body."""
    assert enc.topk is not None
    names = sorted(tensors)
    keep, values, offset = [], [], 0
    for name in names:
        flat = np.asarray(tensors[name], np.float32).reshape(-1)
        k = min(flat.size, math.ceil(enc.topk * flat.size))
        top = np.zeros(0, np.int64)
        if k:
            top = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        keep.append(top + offset)
        values.append(flat[top])
        offset += flat.size
    positions = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    out = _encode_value(_VALUES, np.concatenate(values) if values else np.zeros(0), enc.value, rng)
    out[_GAPS] = varint(np.diff(positions, prepend=-1) - 1)
    out[_LAYOUT] = _pack_layout(tensors, names)
    return out


def _pack_layout(tensors: Tensors, names: list[str]) -> np.ndarray:
    layout = [[name, list(np.shape(tensors[name]))] for name in names]
    return np.frombuffer(zlib.compress(json.dumps(layout).encode(), 9), np.uint8)


def _split(flat: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> Tensors:
    """A flat run of values back into the tensors of ``layout``."""
    out, offset = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out


def _layout(body: Tensors) -> list[tuple[str, tuple[int, ...]]]:
    raw = body.get(_LAYOUT)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise PayloadError("a top-k body needs its layout (uint8)")
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(raw.tobytes(), MAX_LAYOUT_BYTES)
        if inflate.unconsumed_tail:
            raise PayloadError(f"top-k layout inflates beyond {MAX_LAYOUT_BYTES} bytes")
        layout = json.loads(text)
    except (zlib.error, ValueError, RecursionError) as err:
        raise PayloadError(f"top-k layout is not compressed JSON: {str(err)[:100]}") from err
    if not isinstance(layout, list):
        raise PayloadError("top-k layout must be a list")
    out, total = [], 0
    for item in layout:
        ok = isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
        dims = item[1] if ok else None
        if not ok or not isinstance(dims, list) or len(dims) > 4:
            raise PayloadError("top-k layout entries are [name, shape of up to 4 dims]")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise PayloadError(f"top-k layout shape of {item[0][:80]!r} is not positive integers")
        total += math.prod(dims) if total <= MAX_ELEMENTS else 0
        if total > MAX_ELEMENTS:
            raise PayloadError(f"top-k layout declares over {MAX_ELEMENTS} entries")
        out.append((item[0], tuple(dims)))
    if len({name for name, _ in out}) != len(out):
        raise PayloadError("top-k layout names a tensor twice")
    return out


def _decode_topk(body: Tensors, enc: Encoding) -> Tensors:
    allowed = {_VALUES, _GAPS, _LAYOUT, *(_VALUES + e for e in _EXTRA)}
    if extra := sorted(set(body) - allowed):
        raise PayloadError(f"a top-k body holds {extra[0][:80]!r}, which it does not use")
    layout = _layout(body)
    size = sum(math.prod(shape) for _, shape in layout)
    if _VALUES not in body or _GAPS not in body or body[_GAPS].dtype != np.uint8:
        raise PayloadError("a top-k body needs its values and uint8 positions")
    values = _decode_value(_VALUES, body, enc.value).reshape(-1)
    positions = np.cumsum(unvarint(body[_GAPS].reshape(-1)) + 1) - 1
    if positions.size != values.size:
        raise PayloadError(f"top-k body: {values.size} values for {positions.size} positions")
    if positions.size and positions[-1] >= size:
        raise PayloadError(f"top-k positions run past the {size} entries of the layout")
    flat = np.zeros(size, np.float32)
    flat[positions] = values
    return _split(flat, layout)


def _decode_flat(body: Tensors) -> Tensors:
    """A q1 body: one run of signs for all tensors, split by the layout."""
    if extra := sorted(set(body) - {_FLAT, _FLAT + _Q1, _FLAT + _Q1LEN, _LAYOUT}):
        raise PayloadError(f"a q1 body holds {extra[0][:80]!r}, which it does not use")
    layout = _layout(body)
    if _FLAT not in body or body[_FLAT].dtype != np.uint8:
        raise PayloadError("a q1 body needs its uint8 sign bits")
    values = _decode_q1(_FLAT, body)
    if values.size != sum(math.prod(shape) for _, shape in layout):
        raise PayloadError(f"a q1 body: {values.size} values for its layout")
    return _split(values, layout)


def _shape(name: str, body: Tensors) -> tuple[int, ...]:
    """The declared shape of a q4 tensor (packed nibbles lose it), bounded."""
    shape = body.get(name + _SHAPE)
    if shape is None or shape.dtype != np.int64 or shape.ndim != 1 or not 1 <= shape.size <= 4:
        raise PayloadError(f"tensor {name} lacks a valid shape entry")
    if shape.min() < 1 or math.prod(int(d) for d in shape) > MAX_ELEMENTS:
        raise PayloadError(f"tensor {name} declares shape {shape.tolist()}, out of bounds")
    return tuple(int(d) for d in shape)


# -- bodies --------------------------------------------------------------------------------------
def encode_tensors(
    tensors: Tensors, encoding: str, rng: np.random.Generator | None = None
) -> Tensors:
    """Return the tensors to put in the safetensors body for ``encoding``; ``rng`` draws the
    stochastic rounding (fresh entropy by default)."""
    enc = parse_encoding(encoding)
    if enc.value == "secagg":
        return _check_masked(tensors)
    if enc.value == "seeds":
        _check_seeds(tensors)
        return {
            "seed_index": tensors["seed_index"].astype(np.int32),
            "coef": tensors["coef"].astype(np.float32),
        }
    rng = rng if rng is not None else np.random.default_rng()
    if bad := [name for name in tensors if name.endswith(_EXTRA)]:
        raise PayloadError(f"tensor name {bad[0]!r} ends like an encoding's own entries")
    if enc.topk is not None:
        return _encode_topk(tensors, enc, rng)
    if enc.value == "q1":
        names = sorted(tensors)
        flat = [np.asarray(tensors[n], np.float32).reshape(-1) for n in names]
        body = _encode_value(_FLAT, np.concatenate(flat) if flat else np.zeros(0), "q1", rng)
        body[_LAYOUT] = _pack_layout(tensors, names)
        return body
    out: Tensors = {}
    for name, value in tensors.items():
        out.update(_encode_value(name, value, enc.value, rng))
        if enc.value.removeprefix("s") in PACKED:  # packed values lose the shape
            out[name + _SHAPE] = np.array(np.shape(value), np.int64)
    return out


def _check_masked(tensors: Tensors) -> Tensors:
    masked = tensors.get("masked")
    if (
        set(tensors) != {"masked"}
        or masked is None
        or masked.dtype != np.uint32
        or masked.ndim != 1
    ):
        raise PayloadError("a secagg body holds exactly one 1-D uint32 tensor, masked")
    return dict(tensors)


def _check_seeds(tensors: Tensors) -> None:
    if set(tensors) != set(SEED_KEYS):
        raise PayloadError(f"a seeds body holds exactly {SEED_KEYS}, got {sorted(tensors)}")
    index, coef = tensors["seed_index"], tensors["coef"]
    if index.ndim != 1 or coef.shape != index.shape:
        raise PayloadError(f"seed_index {index.shape} and coef {coef.shape} must be equal 1-D")
    if index.size and (index.min() < 0 or not np.issubdtype(index.dtype, np.integer)):
        raise PayloadError("seed_index must hold non-negative integers")


def decode_tensors(body: Tensors, encoding: str) -> Tensors:
    """Invert :func:`encode_tensors`, checking everything, so a mislabelled or forged body is
    refused by name."""
    enc = parse_encoding(encoding)
    if enc.value == "secagg":
        return _check_masked(body)
    if enc.value == "seeds":
        if (
            body.get("seed_index", np.zeros(0, np.int32)).dtype != np.int32
            or body.get("coef", np.zeros(0, np.float32)).dtype != np.float32
        ):
            raise PayloadError("a seeds body needs int32 seed_index and float32 coef")
        _check_seeds(body)
        return dict(body)
    if enc.topk is not None:
        return _decode_topk(body, enc)
    if enc.value == "q1":
        return _decode_flat(body)
    names = [k for k in body if not k.endswith(_EXTRA)]
    known = set(names)
    for key in body:
        if key.endswith(_EXTRA) and key[: key.rindex(".")] not in known:
            raise PayloadError(f"body entry {key[:80]!r} belongs to no tensor")
    if enc.value.removeprefix("s") == "q8" and (whole := _decode_q8_blocks(body, names)):
        return whole
    out: Tensors = {}
    for name in names:
        if enc.value.removeprefix("s") in PACKED:
            shape, values = _shape(name, body), _decode_value(name, body, enc.value)
            if values.size != math.prod(shape):
                raise PayloadError(f"tensor {name}: {values.size} values for shape {shape}")
            out[name] = values.reshape(shape)
        else:
            out[name] = _decode_value(name, body, enc.value)
    return out
