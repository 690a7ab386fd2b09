import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.codec.compress import encode_tensors
from fleetune.edge_sdk.errors import PayloadError

pytestmark = pytest.mark.unit


def _header(**kw):
    base = dict(
        kind="update",
        sender="d1",
        round=3,
        base_sha256="ab" * 32,
        adapter={"kind": "lora", "r": 2},
        encoding="f32",
        num_examples=7,
    )
    return codec.Header(**{**base, **kw})


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(4, 16)).astype(np.float32),
        "b": rng.normal(size=(16, 4)).astype(np.float32),
    }


@pytest.mark.parametrize("encoding,tol", [("f32", 0.0), ("f16", 2e-3), ("q8", 0.02)])
def test_round_trip_keeps_header_and_tensors(encoding, tol):
    # Prepare
    tensors = _tensors()
    # Execute
    header, out = codec.decode(codec.encode(_header(encoding=encoding), tensors))
    # Assert
    assert header == _header(encoding=encoding)
    for name, value in tensors.items():
        err = np.abs(out[name] - value).max() / np.abs(value).max()
        assert err <= tol, name


def test_compressed_encodings_are_smaller():
    tensors = {"w": np.ones((64, 64), dtype=np.float32)}
    sizes = {e: len(codec.encode(_header(encoding=e), tensors)) for e in ("f32", "f16", "q8")}
    assert sizes["q8"] < sizes["f16"] < sizes["f32"]


def _reframe(data: bytes, meta_edit=None, body=None) -> bytes:
    """Rebuild an envelope with an edited header and/or body (keeping the hash right)."""
    magic, schema, head_len = struct.unpack_from(">4sBI", data)
    meta = json.loads(data[9 : 9 + head_len])
    body = data[9 + head_len :] if body is None else body
    meta["payload_sha256"] = hashlib.sha256(body).hexdigest()
    meta["payload_bytes"] = len(body)
    if meta_edit:
        meta_edit(meta)
    head = json.dumps(meta).encode()
    return struct.pack(">4sBI", magic, schema, len(head)) + head + body


def _q8_body(scale_of_a=None) -> bytes:
    """A q8 body whose tensor ``a`` has no scale (``None``) or the given one."""
    body = encode_tensors(_tensors(), "q8")
    del body["a.q8scale"]
    if scale_of_a is not None:
        body["a.q8scale"] = scale_of_a
    return st_save(body)


def _as_q8(meta):
    meta.update(encoding="q8")


@pytest.mark.parametrize(
    "mangle,message",
    [
        (lambda d: d[:5], "too short"),
        (lambda d: b"XXXX" + d[4:], "not a fleetune envelope"),
        (lambda d: d[:4] + bytes([9]) + d[5:], "schema 9"),
        (lambda d: d[:5] + struct.pack(">I", 10**9) + d[9:], "header length"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "sha256 does not match"),
        (lambda d: d[:-10], "body is"),
        (lambda d: _reframe(d, lambda m: m.update(kind="virus")), "kind"),
        (lambda d: _reframe(d, lambda m: m.update(round=-1)), "round"),
        (lambda d: _reframe(d, lambda m: m.pop("sender")), "lacks a field"),
        (lambda d: _reframe(d, lambda m: m.update(encoding="f16")), "header says f16"),
        (lambda d: _reframe(d, body=b"not safetensors at all"), "not valid safetensors"),
        (lambda d: d[:9] + b"{" * 5 + d[14:], "not valid JSON"),
        (lambda d: d[:5] + struct.pack(">I", 2) + b"[]", "header is not a JSON object"),
        (lambda d: _reframe(d, _as_q8, body=_q8_body()), "tensor a lacks a valid q8 scale"),
        (
            lambda d: _reframe(d, _as_q8, body=_q8_body(np.ones(3, np.float32))),
            "tensor a lacks a valid q8 scale",
        ),
        (lambda d: _reframe(d, lambda m: m.update(base_sha256="ab")), "64-character hex digest"),
        (lambda d: _reframe(d, lambda m: m.update(sender="")), "sender must be a non-empty"),
        (lambda d: _reframe(d, lambda m: m.update(adapter=[8])), "adapter and metrics must be"),
        (lambda d: _reframe(d, lambda m: m.update(metrics="x")), "adapter and metrics must be"),
        (lambda d: d.decode("latin-1"), "expected bytes, got str"),
    ],
)
def test_every_rejection_names_the_problem(mangle, message):
    # Prepare
    good = codec.encode(_header(), _tensors())
    # Execute / Assert
    with pytest.raises(PayloadError, match=message):
        codec.decode(mangle(good))


def test_oversized_message_is_refused_before_parsing():
    data = codec.encode(_header(), _tensors())
    with pytest.raises(PayloadError, match="over the 100 limit"):
        codec.decode(data, max_bytes=100)
    with pytest.raises(PayloadError, match="over the 100 limit"):
        codec.encode(_header(), _tensors(), max_bytes=100)


def test_non_finite_values_are_refused():
    tensors = _tensors()
    tensors["a"][0, 0] = np.nan
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.decode(codec.encode(_header(), tensors))


def test_f16_overflow_is_refused():
    with pytest.raises(PayloadError, match="f16 range"):
        codec.encode(_header(encoding="f16"), {"a": np.full((2, 2), 1e6, dtype=np.float32)})


def test_q8_keeps_zero_rows_exact():
    tensors = {"b": np.zeros((8, 4), dtype=np.float32)}
    _, out = codec.decode(codec.encode(_header(encoding="q8"), tensors))
    assert np.array_equal(out["b"], tensors["b"])


def test_seeds_body_round_trips_and_is_checked():
    # Prepare
    body = {"seed_index": np.array([3, 9, 3], np.int32), "coef": np.array([0.5, -1, 2], np.float32)}
    # Execute
    _, out = codec.decode(codec.encode(_header(encoding="seeds"), body))
    # Assert
    assert out["seed_index"].tolist() == [3, 9, 3] and out["coef"].tolist() == [0.5, -1, 2]
    with pytest.raises(PayloadError, match="exactly"):
        codec.encode(_header(encoding="seeds"), {"coef": body["coef"]})
    with pytest.raises(PayloadError, match="non-negative"):
        codec.encode(_header(encoding="seeds"), {**body, "seed_index": np.array([-1, 0, 1])})
