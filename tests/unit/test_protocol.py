"""Every wire message: round trips, named refusals, and property-based checks that any bytes
give either a valid message or a ``PayloadError`` (never another exception)."""

import contextlib
import hashlib
import json
import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.protocol import (
    Announcement,
    DeviceStatus,
    GlobalAdapter,
    GlobalSeeds,
    MixtureUpload,
    PersonalAdapter,
    Prior,
    SeedPool,
    SeedRun,
    Update,
    decode_global,
)
from tests.fuzz.targets import (
    BASE,
    ENVELOPES,
    FLEET,
    JSON_DECODERS,
    SEEDS,
    SPEC,
    TARGETS,
    _seeds,
    valid_or_payload_error,
)

pytestmark = pytest.mark.unit

FLEET_SIZE = sum(int(np.prod(shape)) for _, shape in SPEC.layout(BASE))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_or_payload_error(decode, payload: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decode(payload)


# -- round trips --------------------------------------------------------------------------------


def test_updates_round_trip_dense_and_seeds():
    dense = Update.decode(ENVELOPES["update"][0](), FLEET)
    seeds = Update.decode(ENVELOPES["update-seeds"][0](), FLEET)
    assert (dense.sender, dense.round, dense.from_version, dense.num_examples) == ("d1", 2, 1, 10)
    assert dense.seeds is None and dense.metrics["steps"] == 3
    assert seeds.delta is None and seeds.seeds is not None
    assert [i for i, _ in seeds.seeds.pairs()] == [3, 5, 3]
    assert [c for _, c in seeds.seeds.pairs()] == pytest.approx([0.01, -0.02, 0.005])
    assert seeds.seeds.merged() == pytest.approx({3: 0.015, 5: -0.02})


def test_a_shared_a_update_carries_no_b_and_decodes_with_zero_b():
    payload = ENVELOPES["update-shared-a"][0]()
    _, body = codec.decode(payload)
    update = Update.decode(payload, FLEET)
    assert body and all(".lora_A." in name for name in body)
    assert update.part == "lora_a" and update.delta is not None
    for name, value in update.delta.items():
        assert value.any() == (".lora_A." in name), name
    full = len(ENVELOPES["update"][0]())
    assert len(payload) < 0.75 * full  # B's bytes stay home (A is the smaller half here: r x in)


@pytest.mark.parametrize("part", ["lora_b", 7, ["all"]])
def test_an_update_of_another_part_is_refused_by_name(part):
    header, body = codec.decode(ENVELOPES["update-shared-a"][0]())
    forged = codec.encode(replace(header, metrics={**header.metrics, "part": part}), body)
    with pytest.raises(PayloadError, match="update part"):
        Update.decode(forged, FLEET)


def test_global_adapters_round_trip_in_both_forms():
    dense = decode_global(ENVELOPES["global"][0](), FLEET)
    seeds = decode_global(ENVELOPES["global-seeds"][0](), FLEET)
    assert isinstance(dense, GlobalAdapter) and dense.version == 3
    assert isinstance(seeds, GlobalSeeds) and (seeds.version, seeds.from_version) == (4, 3)
    assert seeds.seeds.pool_seed == 77


def test_mixture_upload_and_answer_round_trip():
    upload = MixtureUpload.decode(ENVELOPES["mixture"][0](), FLEET)
    answer = PersonalAdapter.decode(ENVELOPES["personal"][0](), FLEET)
    assert upload.coef.shape == (3, 1) and upload.heldout_loss == pytest.approx(3.2)
    assert upload.zo is not None and upload.zo_pool_size == 4096
    assert (answer.mixture_sha256, answer.basis_version, answer.cluster) == ("ab" * 32, 2, 1)


def test_announcement_prior_and_status_round_trip():
    sent = Announcement(4, 3, BASE.sha256, SPEC.to_dict(), 60.0, False, SeedPool(9, 64))
    assert Announcement.decode(sent.encode()) == sent
    prior = Prior.decode(Prior(2, np.array([0.5, 0.5], np.float32), 3).encode())
    assert (prior.version, prior.devices, prior.prior.tolist()) == (2, 3, [0.5, 0.5])
    assert DeviceStatus.decode(DeviceStatus("offline").encode()).state == "offline"


# -- named refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"round": "1", "adapter_version": 0}', "round announcement round"),
        (b'{"round": 1, "adapter_version": 0, "timeout_s": 1e400}', "timeout_s"),
        (b'{"round": 1, "adapter_version": 99999999999999999999}', "adapter_version"),
        (b'{"round": 1, "adapter_version": 0, "adapter": {"r": 1e400}}', "LoRA spec"),
        (b'{"round": 1, "adapter_version": 0, "zo": {"pool_seed": -1}}', "pool_seed"),
        (b"[" * 30000 + b"]" * 30000, "not JSON"),
    ],
)
def test_bad_announcements_are_named(payload, message):
    with pytest.raises(PayloadError, match=message):
        Announcement.decode(payload)


def test_an_announcement_for_another_fleet_is_a_config_error():
    other_base = Announcement(1, 0, "cd" * 32)
    other_spec = Announcement(1, 0, BASE.sha256, LoraSpec(r=4).to_dict())
    with pytest.raises(ConfigError, match="the fleet runs base cdcdcdcdcdcd"):
        other_base.check(FLEET)
    with pytest.raises(ConfigError, match="the fleet tunes"):
        other_spec.check(FLEET)


def test_windows_nest_a_device_in_a_fleet_that_tunes_deeper():
    """A window device (the top layer of two) in a full-depth fleet: its update holds its
    window, the fleet's pushes hold every layer; nothing else nests."""
    from fleetune.edge_sdk.adapters.lora import init_lora
    from fleetune.edge_sdk.protocol import Fleet

    top = Fleet(BASE, replace(SPEC, window=1))
    mine = init_lora(top.spec, BASE)
    # Execute: a window device's update at the fleet; the fleet's adapter at the device
    update = Update.decode(Update("d1", 1, 0, 5, delta=mine).encode(top, "f32"), FLEET)
    pushed = GlobalAdapter.decode(GlobalAdapter(2, init_lora(SPEC, BASE)).encode(FLEET), top)
    # Assert
    assert update.spec == top.spec and set(update.delta or {}) == set(mine)
    assert (
        set(pushed.tensors) == set(init_lora(SPEC, BASE))
        and top.narrow(pushed.tensors).keys() == mine.keys()
    )
    Announcement(1, 0, BASE.sha256, SPEC.to_dict()).check(top)  # the device joins
    with pytest.raises(ConfigError, match="top layers"):  # a deeper device, a window fleet
        Announcement(1, 0, BASE.sha256, top.spec.to_dict()).check(FLEET)
    with pytest.raises(ConfigError, match="the fleet tunes"):  # another rank
        Announcement(1, 0, BASE.sha256, replace(SPEC, r=4, window=1).to_dict()).check(top)
    with pytest.raises(PayloadError, match="adapter spec"):  # a full update at a window fleet
        Update.decode(Update("d1", 1, 0, 5, delta=init_lora(SPEC, BASE)).encode(FLEET), top)
    with pytest.raises(PayloadError, match="adapter spec"):  # a window pushed to a full device
        GlobalAdapter.decode(GlobalAdapter(2, mine).encode(top), FLEET)
    masked = Update("d1", 1, 0, 5, masked=np.zeros(FLEET_SIZE, np.uint32)).encode(top)
    with pytest.raises(PayloadError, match="whole adapter"):
        Update.decode(masked, FLEET)


def test_the_server_sums_window_updates_tensor_by_tensor_only():
    """A window device's seeds: refused where the round is not a running FedAvg sum; taken as
    the dense delta of its window, the same the device's own replay gives."""
    from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
    from fleetune.edge_sdk.protocol import Fleet
    from fleetune.edge_sdk.tuners.zo import apply_run
    from fleetune.server.seeds import SeedPools
    from fleetune.server.validation import check_update

    top = Fleet(BASE, replace(SPEC, window=1))
    pools = SeedPools("t", FlatLayout(SPEC, BASE), 4096, "lora_b")
    run = SeedRun.from_pairs([(3, 0.5), (9, -0.25)], pools.pool(1).pool_seed)
    payload = Update("d1", 1, 0, 5, seeds=run).encode(top)
    with pytest.raises(PayloadError, match="only running FedAvg sums"):
        check_update(payload, "d1", FLEET, 1, 0, pools.pool, set())
    taken = check_update(payload, "d1", FLEET, 1, 0, pools.pool, set(), windows=pools.replay)
    layout = FlatLayout(top.spec, BASE)
    own = layout.unflatten(
        apply_run(np.zeros(layout.size, np.float32), layout.indices("lora_b"), run)
    )
    assert taken.seeds is None and taken.delta is not None and taken.delta.keys() == own.keys()
    for name, value in own.items():
        np.testing.assert_allclose(taken.delta[name], value, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"from_version": 0}, "pool_seed"),
        ({"from_version": 0, "pool_seed": -4}, "pool_seed"),
        ({"from_version": 0, "pool_seed": 4, "params": "everything"}, "move 'everything'"),
        ({"from_version": 5, "pool_seed": 4}, "must start from v0"),
    ],
)
def test_a_junk_seeds_adapter_is_a_payload_error(metrics, reason):
    header = FLEET.header("adapter", "server", "seeds", round=1, version=1, metrics=metrics)
    body = {"seed_index": np.array([1], np.int32), "coef": np.array([0.1], np.float32)}
    with pytest.raises(PayloadError, match=reason):
        decode_global(codec.encode(header, body), FLEET)


def test_seed_runs_are_checked_in_one_place():
    run = _seeds()
    run.check(pool_size=8)
    with pytest.raises(PayloadError, match="outside the pool of 4"):
        run.check(pool_size=4)
    with pytest.raises(PayloadError, match=r"exceeds 0\.01"):
        run.check(pool_size=8, max_coef=0.01)
    with pytest.raises(PayloadError, match="over the limit of 2"):
        run.check(pool_size=8, max_pairs=2)
    repeated = SeedRun.from_pairs([(1, 1.0)] * 10_000, pool_seed=7)  # each pair is allowed
    with pytest.raises(PayloadError, match=r"one seed index sum beyond 1\.0"):
        repeated.check(pool_size=8)
    with pytest.raises(PayloadError, match="non-negative"):
        SeedRun(1, np.array([-1]), np.array([0.1]))
    with pytest.raises(PayloadError, match="finite"):
        SeedRun(1, np.array([1]), np.array([np.inf]))
    with pytest.raises(PayloadError, match="seed index"):
        SeedRun.from_json({"pool_seed": 1, "pool_size": 4, "pairs": [[9, 0.1]]})


def test_huge_or_infinite_header_numbers_are_refused():
    header = FLEET.header("update", "d1", "f32", num_examples=5).__dict__
    for field, value in (("num_examples", 2**63), ("round", -1), ("version", 1.5)):
        meta = {**header, field: value}
        with pytest.raises(PayloadError, match=field):
            codec.Header(**meta)
    with pytest.raises(PayloadError, match="LoRA spec"):
        Update.decode(_with_header(adapter={"kind": "lora", "r": float("inf")}), FLEET)


# -- property-based: any bytes → a message or a PayloadError ------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = (
    "round",
    "adapter_version",
    "version",
    "prior",
    "state",
    "timeout_s",
    "zo",
    "done",
    "base_sha256",
    "adapter",
    "devices",
    "pool_seed",
    "pool_size",
)


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(payload=st.binary(max_size=512))
def test_any_bytes_decode_or_raise_payload_error(name, payload):
    valid_or_payload_error(name, payload)


@pytest.mark.parametrize("name", sorted(JSON_DECODERS))
@FUZZ
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8))
def test_any_json_object_decodes_or_raises_payload_error(name, body):
    payload = json.dumps(body, allow_nan=True).encode()
    _valid_or_payload_error(JSON_DECODERS[name], payload)


def _with_header(**changes) -> bytes:
    """A valid dense update whose header fields are replaced (the body hash stays valid)."""
    header, tensors = codec.decode(ENVELOPES["update"][0]())
    meta = {**header.__dict__, "encoding": "f32", **changes}
    body = save(codec.encode_tensors(tensors, "f32"))
    meta.update(schema=1, payload_sha256=hashlib.sha256(body).hexdigest(), payload_bytes=len(body))
    head = json.dumps(meta, allow_nan=True).encode()
    return struct.pack(">4sBI", b"FLTN", 1, len(head)) + head + body


HEADER_FIELDS = (
    "kind",
    "sender",
    "round",
    "base_sha256",
    "adapter",
    "encoding",
    "num_examples",
    "version",
    "metrics",
)


@pytest.mark.parametrize("name", sorted(ENVELOPES))
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HEADER_FIELDS), JSON, max_size=3))
def test_any_header_decodes_or_raises_payload_error(name, changes):
    _valid_or_payload_error(ENVELOPES[name][1], _with_header(**changes))


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_corrupted_valid_messages_decode_or_raise_payload_error(name, data):
    payload = bytearray(SEEDS[name]())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    valid_or_payload_error(name, bytes(payload[:cut]))


def test_the_messages_that_killed_the_server_are_payload_errors():
    """Issue 13's probe: each of these single messages used to raise past the round loop."""
    # a BF16 safetensors body (numpy has no bfloat16: safetensors raised KeyError)
    head = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    bf16 = struct.pack("<Q", len(head)) + head + b"\x00\x00\x80\x3f"
    meta = {
        **FLEET.header("update", "d1", "f32").__dict__,
        "schema": 1,
        "payload_sha256": hashlib.sha256(bf16).hexdigest(),
        "payload_bytes": len(bf16),
    }
    text = json.dumps(meta).encode()
    envelope = struct.pack(">4sBI", b"FLTN", 1, len(text)) + text + bf16
    cases = {
        "bf16 body": envelope,
        "2**63 examples": _with_header(num_examples=2**63),
        "r = Infinity": _with_header(adapter={"kind": "lora", "r": float("inf"), "alpha": 16}),
    }
    nested = b'{"metrics": ' + b"[" * 30000 + b"]" * 30000 + b"}"  # 60 KB, under the header cap
    cases["metrics 30,000 deep"] = struct.pack(">4sBI", b"FLTN", 1, len(nested)) + nested
    for payload in cases.values():
        with pytest.raises(PayloadError):
            Update.decode(payload, FLEET)
    deep = b'{"metrics": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    with pytest.raises(PayloadError, match="not JSON"):
        Announcement.decode(deep)


def test_secure_aggregation_messages_round_trip_and_refuse_by_name():
    from fleetune.edge_sdk.protocol import Reveal, SecAggRound, Unmask

    cohort = SecAggRound({"a": "ab" * 32, "b": "cd" * 32}, 1.0, 2.0**20)
    sent = Announcement(2, 1, secagg=cohort)
    assert Announcement.decode(sent.encode()).secagg == cohort
    assert Unmask.decode(Unmask(3, ("c",)).encode()) == Unmask(3, ("c",))
    assert Reveal.decode(Reveal("a", 3, {"c": "ef" * 32}).encode()).seeds == {"c": "ef" * 32}
    for body, message in [
        ({"cohort": {"a": "ab" * 32}, "bound": 1.0, "scale": 1.0}, "two devices"),
        ({"cohort": {"a": "zz" * 32, "b": "ab" * 32}, "bound": 1.0, "scale": 1.0}, "64 hex"),
        ({"cohort": {"a/b": "ab" * 32, "b": "ab" * 32}, "bound": 1.0, "scale": 1.0}, "device id"),
        ({"cohort": {"a": "ab" * 32, "b": "ab" * 32}, "bound": 1.0, "scale": 1e12}, "overflows"),
    ]:
        with pytest.raises(PayloadError, match=message):
            SecAggRound.from_dict(body)
    with pytest.raises(PayloadError, match="masking_key"):
        DeviceStatus.decode(b'{"state": "online", "masking_key": "xyz"}')
