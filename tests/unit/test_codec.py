import hashlib
import json
import struct
import zlib

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


# -- q4, stochastic rounding, top-k, error feedback -----------------------------------------------


def _per_block_bound(value: np.ndarray, block: int, levels: int) -> np.ndarray:
    """Each entry's quantization step: its block's absmax / levels."""
    flat = np.pad(value.reshape(-1), (0, (-value.size) % block)).reshape(-1, block)
    step = np.abs(flat).max(axis=1, keepdims=True) / levels
    return np.broadcast_to(step, flat.shape).reshape(-1)[: value.size].reshape(value.shape)


@pytest.mark.parametrize(
    "encoding,block,levels,rounding",
    [("q8", 64, 127, 0.5), ("q4", 32, 7, 0.5), ("sq8", 64, 127, 1.0), ("sq4", 32, 7, 1.0)],
)
def test_block_quantizers_stay_within_their_step(encoding, block, levels, rounding):
    # Prepare: shapes that do not fill the last block
    tensors = {"a": _tensors()["a"], "odd": np.linspace(-3, 2, 37, dtype=np.float32)}
    # Execute
    _, out = codec.decode(codec.encode(_header(encoding=encoding), tensors))
    # Assert: nearest rounding errs by at most half a step, stochastic by less than one
    for name, value in tensors.items():
        assert out[name].shape == value.shape
        step = _per_block_bound(value, block, levels)
        assert np.all(np.abs(out[name] - value) <= rounding * step + 1e-6), name


@pytest.mark.parametrize("encoding", ["sq8", "sq4"])
def test_stochastic_rounding_is_unbiased(encoding):
    # Prepare: values between the levels, where nearest rounding is biased
    value = {"w": np.full((1, 32), 0.3, np.float32)}
    value["w"][0, 0] = 7.0  # the block's absmax: q4's step is 1.0, q8's 7/127
    rng = np.random.default_rng(0)
    # Execute
    mean = np.mean(
        [
            codec.decode_tensors(encode_tensors(value, encoding, rng), encoding)["w"]
            for _ in range(2000)
        ],
        axis=0,
    )
    nearest = codec.decode_tensors(encode_tensors(value, encoding[1:]), encoding[1:])["w"]
    # Assert
    assert abs(mean[0, 5] - 0.3) < 0.03
    if encoding == "sq4":
        assert nearest[0, 5] == 0.0  # q4 rounds 0.3 to 0: biased


def test_q1_sends_signs_and_each_blocks_mean_magnitude():
    # Prepare: a tensor that does not fill its last block of 128, and a block of zeros
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 100)).astype(np.float32)
    w[2, 56:] = 0.0
    tensors = {"w": w, "z": np.zeros(5, np.float32)}
    # Execute
    body = encode_tensors(tensors, "q1")
    out = codec.decode_tensors(body, "q1")
    # Assert: each entry's sign (zero counts as +) times its block's mean |value|; 1.25 bits
    # (one flat body, the tensors in name order: w's 300 values, then z's 5)
    flat = np.concatenate([w.reshape(-1), tensors["z"]])
    got = np.concatenate([out["w"].reshape(-1), out["z"]])
    assert out["w"].shape == (3, 100) and body["flat.values"].size == 39  # ceil(305 / 8)
    for start in (0, 128, 256):
        block = flat[start : start + 128]
        want = np.where(block >= 0, 1.0, -1.0) * np.abs(block).mean()
        np.testing.assert_allclose(got[start : start + 128], want, rtol=1e-6)


def test_topk_keeps_the_largest_entries_and_zeroes_the_rest():
    # Prepare
    w = np.arange(1, 101, dtype=np.float32).reshape(10, 10) * np.where(
        np.arange(100) % 2, 1, -1
    ).reshape(10, 10)
    # Execute
    dense = codec.decode_tensors(encode_tensors({"w": w}, "topk:0.1+f32"), "topk:0.1+f32")["w"]
    # Assert: the ten of largest magnitude (91..100), exactly; zeros elsewhere
    kept = np.flatnonzero(dense)
    assert sorted(np.abs(w.reshape(-1)[kept]).tolist()) == list(range(91, 101))
    np.testing.assert_array_equal(dense.reshape(-1)[kept], w.reshape(-1)[kept])


def test_topk_positions_are_one_byte_gaps_at_five_percent():
    from fleetune.edge_sdk.codec.compress import unvarint, varint

    # Prepare
    numbers = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 + 5, 2**35 - 1])
    w = {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}
    # Execute
    body = encode_tensors(w, "topk:0.05+q8")
    # Assert: LEB128 round-trips; 205 kept entries cost about one byte of position each
    np.testing.assert_array_equal(unvarint(varint(numbers)), numbers)
    assert len(varint(numbers)) == 1 + 1 + 1 + 2 + 2 + 3 + 4 + 5 + 5
    assert body["topk.values"].size == 205 and body["topk.gaps"].size < 1.2 * 205
    assert np.count_nonzero(codec.decode_tensors(body, "topk:0.05+q8")["w"]) == 205


def test_a_lora_update_under_topk_is_twenty_times_smaller_than_f32():
    # Prepare: SmolLM2-135M's LoRA r=8 on q,v (30 layers), as an update
    rng = np.random.default_rng(0)
    delta = {}
    for layer in range(30):
        for proj, rows in (("q_proj", 576), ("v_proj", 192)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            delta[f"{name}.lora_A.weight"] = rng.normal(size=(8, 576)).astype(np.float32)
            delta[f"{name}.lora_B.weight"] = rng.normal(size=(rows, 8)).astype(np.float32)
    # Execute
    sizes = {
        e: len(codec.encode(_header(encoding=e), delta))
        for e in ("f32", "q4", "q1", "topk:0.05+q8")
    }
    # Assert
    assert sizes["f32"] / sizes["q4"] > 5
    assert 24 < sizes["f32"] / sizes["q1"] < 26
    assert sizes["f32"] / sizes["topk:0.05+q8"] > 20
    assert sizes["topk:0.05+q8"] < 128 * 1024  # fits an AWS IoT Core message


@pytest.mark.parametrize(
    "encoding",
    ["topk:0+q8", "topk:1.5+q8", "topk:0.1+seeds", "topk:0.1+q3", "zstd", "topk:0.1234567+q8"],
)
def test_an_unknown_codec_is_refused_by_name(encoding):
    with pytest.raises(PayloadError, match="unknown encoding"):
        _header(encoding=encoding)
    with pytest.raises(PayloadError, match="unknown encoding"):
        codec.decode_tensors({}, encoding)


def _layout(items) -> np.ndarray:
    return np.frombuffer(zlib.compress(json.dumps(items).encode()), np.uint8)


BOMB = np.frombuffer(zlib.compress(b" " * (2 << 20)), np.uint8)


@pytest.mark.parametrize(
    "edit,encoding,message",
    [
        (lambda b: b.update({"topk.gaps": b["topk.gaps"][:-1]}), "topk:0.05+q8", "values for"),
        (lambda b: b.update({"topk.gaps": np.full(3, 0xFF, np.uint8)}), "topk:0.05+q8", "middle"),
        (lambda b: b.update({"topk.gaps": np.full(205, 0x7F, np.uint8)}), "topk:0.05+q8", "past"),
        (
            lambda b: b.update({"topk.layout": _layout([["w", [1 << 20, 1 << 20]]])}),
            "topk:0.05+q8",
            "over",
        ),
        (lambda b: b.update({"topk.layout": _layout([["w", [0]]])}), "topk:0.05+q8", "positive"),
        (
            lambda b: b.update({"topk.layout": _layout([["w", [9]], ["w", [1]]])}),
            "topk:0.05+q8",
            "twice",
        ),
        (lambda b: b.update({"topk.layout": _layout({"w": 1})}), "topk:0.05+q8", "a list"),
        (
            lambda b: b.update({"topk.layout": np.frombuffer(b"junk", np.uint8)}),
            "topk:0.05+q8",
            "compressed",
        ),
        (lambda b: b.update({"topk.layout": BOMB}), "topk:0.05+q8", "inflates beyond"),
        (lambda b: b.update({"stray": np.zeros(1, np.float32)}), "topk:0.05+q8", "does not use"),
        (lambda b: b.pop("topk.gaps"), "topk:0.05+q8", "positions"),
        (lambda b: b.update({"w.q4len": np.array([10**9], np.int64)}), "q4", "cannot hold"),
        (lambda b: b.update({"w": np.zeros(2048, np.int8)}), "q4", "is int8"),
        (
            lambda b: b.update({"w.shape": np.array([1 << 20, 1 << 20], np.int64)}),
            "q4",
            "out of bounds",
        ),
        (lambda b: b.update({"x.q8scale": np.ones(1, np.float32)}), "q8", "belongs to no tensor"),
        (
            lambda b: b.update({"flat.values.q1len": np.array([10**9], np.int64)}),
            "q1",
            "cannot hold",
        ),
        (lambda b: b.update({"flat.values.q1scale": np.ones(3, np.float32)}), "q1", "q1 scale"),
        (lambda b: b.update({"flat.values": np.zeros(512, np.int8)}), "q1", "uint8 sign bits"),
        (lambda b: b.update({"q1.layout": _layout([["w", [9]]])}), "q1", "does not use"),
        (lambda b: b.update({"topk.layout": _layout([["w", [9]]])}), "q1", "for its layout"),
    ],
)
def test_forged_sparse_and_packed_bodies_are_refused_by_name(edit, encoding, message):
    w = {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}
    body = encode_tensors(w, encoding)
    edit(body)
    with pytest.raises(PayloadError, match=message):
        codec.decode_tensors(body, encoding)


def test_error_feedback_sends_everything_in_the_end_and_survives_a_restart(tmp_path):
    """What top-k leaves out is added to the next update; the residual is on disk, so a fresh
    ErrorFeedback (a reboot) goes on from it. Sum of what was sent + residual = sum intended."""
    from fleetune.edge_sdk.codec.feedback import ErrorFeedback

    # Prepare
    rng = np.random.default_rng(0)
    intended = [{"w": rng.normal(size=(32, 32)).astype(np.float32)} for _ in range(4)]
    sent_total = np.zeros((32, 32), np.float32)
    # Execute: two updates, a reboot, two more
    for i, delta in enumerate(intended):
        feedback = ErrorFeedback(tmp_path / "residual.safetensors")  # a new one each round
        with_residual = feedback.add(delta)
        body = encode_tensors(with_residual, "topk:0.1+q8")
        sent = codec.decode_tensors(body, "topk:0.1+q8")
        feedback.keep(with_residual, sent)
        sent_total += sent["w"]
        if i == 0:  # the first update alone sends 10% of the entries
            assert np.count_nonzero(sent["w"]) == 103
    # Assert: nothing was lost, only delayed
    residual = ErrorFeedback(tmp_path / "residual.safetensors").residual()["w"]
    np.testing.assert_allclose(sent_total + residual, sum(d["w"] for d in intended), atol=1e-4)
    assert np.abs(residual).max() > 0


def test_error_feedback_leaves_no_residual_for_what_is_never_sent(tmp_path):
    from fleetune.edge_sdk.codec.feedback import ErrorFeedback

    feedback = ErrorFeedback(tmp_path / "r.safetensors")
    feedback.keep(
        {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, {"a": np.zeros(4, np.float32)}
    )
    assert set(feedback.residual()) == {"a"}
    (tmp_path / "r.safetensors").write_bytes(b"junk")
    assert feedback.residual() == {}  # unreadable: start afresh, with a warning
