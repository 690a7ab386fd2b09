"""Scenarios: the server and devices over the in-process broker (tiny model): rounds, rejections,
recovery, mixtures."""

import json
import logging
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.protocol import Fleet, GlobalAdapter
from fleetune.edge_sdk.signing import Keyring, Signer
from fleetune.edge_sdk.transport.base import Message
from fleetune.edge_sdk.transport.memory import MemoryBroker
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig
from fleetune.server.workers import Partial
from tests.conftest import started, tiny_manifest

pytestmark = pytest.mark.integration
SPEC = LoraSpec(r=2)


def _server(tmp_path, broker, **kw):
    config = ServerConfig(
        fleet="t",
        lora_r=2,
        lora_alpha=16.0,
        state_dir=str(tmp_path / "srv"),
        **{"rounds": 1, "quorum": 2, "round_timeout_s": 10.0, **kw},
    )
    return FleetServer(config, tiny_manifest(), transport=broker.client("server"))


def _tensors(value):
    return {k: np.full_like(v, value) for k, v in init_lora(SPEC, tiny_manifest()).items()}


def _update(device, value, round_=1, base="ab" * 32, examples=10, version=0, metrics=None):
    delta = {k: np.full_like(v, value) for k, v in init_lora(SPEC, tiny_manifest()).items()}
    header = codec.Header(
        kind="update",
        sender=device,
        round=round_,
        base_sha256=base,
        adapter=SPEC.to_dict(),
        encoding="f32",
        num_examples=examples,
        version=version,
        metrics=metrics or {},
    )
    return codec.encode(header, delta)


def _verified(server, payload):
    """A push as a device that pinned the fleet's key opens it."""
    return Keyring([server.signer.public]).open(payload, "push")


def _run_in_thread(server):
    out = {}
    return started(lambda: out.setdefault("results", server.run()), name="server"), out


def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path):
    # Prepare: a server that serves its metrics
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    from fleetune.server.broker import free_port

    broker = MemoryBroker()
    port = free_port()
    server = _server(tmp_path, broker, metrics_port=port)
    topics = Topics("t")
    device = broker.client("devices")
    device.connect()
    device.subscribe(topics.global_adapter)
    thread, out = _run_in_thread(server)
    # Execute: junk, a foreign base, a stale round, a forged sender, then two good updates
    device.publish(topics.update("d0"), b"garbage")
    device.publish(topics.update("d0"), _update("d0", 1.0, base="cd" * 32))
    device.publish(topics.update("d0"), _update("d0", 1.0, round_=7))
    device.publish(topics.update("d9"), _update("d0", 1.0))
    device.publish(
        topics.update("d1"), _update("d1", 1.0, examples=30, metrics={"served": "local"})
    )
    device.publish(topics.update("d1"), _update("d1", 9.0))  # a duplicate, after the good one
    device.publish(
        topics.update("d2"), _update("d2", -1.0, examples=10, metrics={"served": "x" * 99})
    )
    thread.join(20)
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    server.close()
    # Assert: each refusal by name in the result, counted by reason in the metrics
    samples = {
        (s.name, s.labels.get("result"), s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for (result_, reason), count in {
        ("accepted", ""): 2,
        ("refused", "malformed"): 1,
        ("refused", "other_model"): 1,
        ("refused", "round"): 1,
        ("refused", "identity"): 1,
        ("refused", "duplicate"): 1,
    }.items():
        assert samples[("fleetune_updates_total", result_, reason)] == count, (result_, reason)
    assert samples[("fleetune_rounds_total", None, None)] == 1
    served = {
        s.labels["adapter"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fleetune_served_total"
    }
    assert served == {"local": 1, "other": 1}  # a device's odd word is not a new label
    assert samples[("fleetune_adapter_version", None, None)] == 1
    (result,) = out["results"]
    assert result.accepted == ["d1", "d2"]
    reasons = " | ".join(why for _, why in result.rejected)
    for expected in (
        "too short for an envelope",
        "is for base cdcdcdcdcdcd",
        "round 7",
        "does not match topic device",
        "a second update from d1",
    ):
        assert expected in reasons
    assert result.version == 1
    # the pushed global = init + (30*1 + 10*(-1)) / 40 = init + 0.5
    globals_ = []
    while (msg := device.recv(timeout=0.1)) is not None:
        globals_.append(codec.decode(_verified(server, msg.payload)))
    header, tensors = globals_[-1]
    init = init_lora(SPEC, tiny_manifest())
    assert header.version == 1
    for name in init:
        np.testing.assert_allclose(tensors[name], init[name] + 0.5, atol=2e-3)  # f16 downlink


def test_an_aggregate_the_downlink_cannot_carry_leaves_state_that_restarts(tmp_path):
    # Prepare: one finite update beyond the f16 downlink's range
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=1)
    device = broker.client("d")
    device.connect()
    thread, out = _run_in_thread(server)
    # Execute
    device.publish(Topics("t").update("d1"), _update("d1", 1e5))
    thread.join(20)
    server.close()
    again = _server(tmp_path, broker, quorum=1)  # the state directory starts again
    # Assert: accepted, but the fleet stays on v0 rather than on an adapter it cannot push
    (result,) = out["results"]
    assert result.accepted == ["d1"] and result.version == 0
    assert again.version == 0 and again.first_round == 2
    again.close()


def test_a_median_server_is_not_moved_by_one_scaled_update(tmp_path):
    # Prepare: three devices, one of which sends its update x100 and claims 2**62 examples
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=3, strategy="median")
    device = broker.client("d")
    device.connect()
    device.subscribe(Topics("t").global_adapter)
    thread, out = _run_in_thread(server)
    # Execute
    device.publish(Topics("t").update("d1"), _update("d1", 0.01))
    device.publish(Topics("t").update("d2"), _update("d2", 0.02))
    device.publish(Topics("t").update("d3"), _update("d3", 1.0 * 100, examples=2**62 - 1))
    thread.join(20)
    server.close()
    # Assert: the global moved by the median delta, 0.02
    (result,) = out["results"]
    assert result.accepted == ["d1", "d2", "d3"] and result.version == 1
    init = init_lora(SPEC, tiny_manifest())
    for name, value in server.current.items():
        np.testing.assert_allclose(value, init[name] + 0.02, atol=1e-6)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_async_rounds_fold_stale_updates_discounted_and_refuse_too_stale_ones(tmp_path, mode):
    # Prepare: buffers of 2, updates up to 1 version behind, FedBuff's 1/sqrt(1 + staleness)
    broker = MemoryBroker()
    server = _server(tmp_path, broker, rounds=3, mode=mode, max_staleness=1, round_timeout_s=3)
    device = broker.client("d")
    device.connect()
    thread, out = _run_in_thread(server)
    topic = Topics("t").update
    # Execute: round 1 from v0; round 2: a late round-1 update (1 behind) and a fresh one;
    # round 3: one from v0 (2 behind) and two fresh ones
    for name, value, round_, version, examples in (
        ("d1", 1.0, 1, 0, 10),
        ("d2", 3.0, 1, 0, 10),
        ("d3", 4.0, 1, 0, 10),
        ("d1", 1.0, 2, 1, 30),
        ("d4", 9.0, 1, 0, 10),
        ("d1", 2.0, 3, 2, 10),
        ("d2", 2.0, 3, 2, 10),
    ):
        device.publish(
            topic(name), _update(name, value, round_, version=version, examples=examples)
        )
    thread.join(30)
    server.close()
    # Assert: by the hand computation; the too-stale update refused by the rule, by name
    assert not thread.is_alive()
    first, second, third = out["results"]
    init = init_lora(SPEC, tiny_manifest())
    assert first.accepted == ["d1", "d2"]
    if mode == "sync":  # round 2 waits out its timeout for a second update of its own and
        # refuses the late ones and the next round's: round 3 gets nothing
        assert second.accepted == ["d1"] and [d for d, _ in second.rejected] == [
            "d3",
            "d4",
            "d1",
            "d2",
        ]
        assert third.accepted == [] and third.version == 2
        expected = 2.0 + 1.0
    else:
        assert second.accepted == ["d3", "d1"] and third.accepted == ["d1", "d2"]
        ((who, why),) = third.rejected
        assert who == "d4" and "2 versions behind v2 (max_staleness = 1)" in why
        assert third.version == 3
        expected = 2.0 + (10 * 4.0 / np.sqrt(2) + 30 * 1.0) / 40 + 2.0
    for name, value in server.current.items():
        np.testing.assert_allclose(value, init[name] + expected, rtol=1e-6)


def test_a_flooding_device_is_cut_off_and_the_round_goes_on(tmp_path):
    # Prepare: one device sends 200 junk updates, then an honest device sends one
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=1, max_messages_per_round=5)
    device = broker.client("d")
    device.connect()
    thread, out = _run_in_thread(server)
    # Execute
    for _ in range(200):
        device.publish(Topics("t").update("flood"), b"junk" * 10)
    device.publish(Topics("t").update("d1"), _update("d1", 1.0))
    thread.join(20)
    logged = server.registry.rejections()
    server.close()
    # Assert: 5 refusals by reason, then one rate-limit refusal, and the honest update counted
    (result,) = out["results"]
    assert result.accepted == ["d1"]
    reasons = [why for who, why in result.rejected if who == "flood"]
    assert len(reasons) == 6 and "over 5 update messages in round 1" in reasons[-1]
    assert len(logged) == 6  # the registry is not flooded either


def test_a_round_without_updates_keeps_the_adapter(tmp_path):
    broker = MemoryBroker()
    server = _server(tmp_path, broker, round_timeout_s=0.3)
    (result,) = server.run()
    server.close()
    assert result.accepted == [] and result.version == 0


def test_updates_that_arrive_together_are_synced_and_recorded_together(tmp_path):
    # Prepare: updates, a duplicate and junk already waiting when the round opens
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=3)
    syncs, save_updates, save_sum = [], server.state.save_accepted, server.state.save_sum

    def updates(round_, items):
        syncs.append(("updates", [device for device, _ in items]))
        save_updates(round_, items)

    def running_sum(round_, encoded):
        syncs.append(("sum", Partial.decode(encoded, server.layout.size)[1].devices))
        save_sum(round_, encoded)

    server.state.save_accepted, server.state.save_sum = updates, running_sum
    inbox, topics = server.transport.inner, Topics("t")
    for device, payload in [
        ("d1", _update("d1", 1.0)),
        ("d2", _update("d2", 2.0)),
        ("junk", b"junk"),
        ("d1", _update("d1", 5.0)),
        ("d3", _update("d3", 3.0)),
        ("d4", _update("d4", 4.0)),  # past the quorum: left for the next round
    ]:
        inbox.deliver(Message(topics.update(device), payload))
    # Execute
    (result,) = server.run()
    rows = server.registry._exec("SELECT device, accepted FROM updates")
    seen = set(server.registry.devices())
    server.close()
    # Assert: one synced file for the three (their sum: fewer bytes than the three here);
    # every row and device recorded; d4 not taken
    assert syncs == [("sum", ["d1", "d2", "d3"])]
    assert result.accepted == ["d1", "d2", "d3"]
    assert [who for who, _ in result.rejected] == ["junk", "d1"]
    assert sorted(rows) == [("d1", 0), ("d1", 1), ("d2", 1), ("d3", 1), ("junk", 0)]
    assert {"d1", "d2", "d3"} <= seen and "d4" not in seen
    for name, value in init_lora(SPEC, tiny_manifest()).items():  # the mean of 1, 2 and 3
        np.testing.assert_allclose(server.current[name], value + 2.0, rtol=1e-6)


def test_a_round_saved_as_its_running_sum_resumes_from_it(tmp_path):
    """Updates larger together than the adapter are made durable as the round's running sum
    (one adapter's bytes); a server that dies before folding resumes from that sum."""
    # Prepare: three updates waiting; the first server dies after collecting them
    broker, topics = MemoryBroker(), Topics("t")
    first = _server(tmp_path, broker, quorum=3)
    for device, value in (("d1", 1.0), ("d2", 2.0), ("d3", 3.0)):
        first.transport.inner.deliver(Message(topics.update(device), _update(device, value)))

    def die(*args, **kw):
        raise RuntimeError("killed before the fold")

    first._aggregate = die
    with pytest.raises(RuntimeError, match="killed before the fold"):
        first.run()
    first.close()
    folder = tmp_path / "srv" / "open-round" / "r000001"
    saved = sorted(p.name for p in folder.iterdir())
    # Execute: a new server on the same state; a fourth update completes the round
    again = _server(tmp_path, broker, quorum=4)
    again.transport.inner.deliver(Message(topics.update("d4"), _update("d4", 6.0)))
    (result,) = again.run()
    again.close()
    # Assert: one synced sum, no update files; the fold counts all four once each
    assert saved == ["s000000.fltnp"]
    assert sorted(result.accepted) == ["d1", "d2", "d3", "d4"]
    for name, value in init_lora(SPEC, tiny_manifest()).items():  # the mean of 1, 2, 3, 6
        np.testing.assert_allclose(again.current[name], value + 3.0, rtol=1e-6)


def test_server_resumes_from_its_registry(tmp_path):
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=1)
    device = broker.client("d")
    device.connect()
    thread, _ = _run_in_thread(server)
    device.publish(Topics("t").update("d1"), _update("d1", 2.0))
    thread.join(20)
    server.close()
    # Execute: a new server on the same state directory
    again = _server(tmp_path, broker, quorum=1)
    # Assert
    assert (again.version, again.first_round) == (1, 2)
    np.testing.assert_allclose(
        next(iter(again.current.values())),
        next(iter(init_lora(SPEC, tiny_manifest()).values())) + 2.0,
    )
    again.close()


def test_device_and_server_complete_rounds_on_a_tiny_model(tmp_path, tiny_base, caplog):
    """EdgeClient + torch backend + FleetServer over the in-process broker (random tiny llama)."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText

    # Prepare: a learnable corpus (a repeated token cycle)
    broker = MemoryBroker()
    config = ServerConfig(
        fleet="t", lora_r=2, rounds=2, quorum=1, round_timeout_s=60, state_dir=str(tmp_path / "srv")
    )
    server = FleetServer(config, tiny_base, transport=broker.client("server"))
    cycle = np.tile(np.arange(16), 40)
    data = ClientData("c", train=cycle[:512].reshape(-1, 16), heldout=cycle[512:].reshape(-1, 16))
    client_cfg = FleetuneConfig(
        device=DeviceConfig(id="d1", state_dir=str(tmp_path / "dev")),
        tuning=TuningConfig(steps=15, lr=5e-2, lora_r=2, batch_size=4),
        sync=SyncConfig(fleet="t", round_wait_s=60, fleet_key=server.signer.public_hex),
    )
    # an attacker's pushes arrive first: unsigned, and signed with a key the fleet never named
    forged = GlobalAdapter(99, _tensors(5.0)).encode(Fleet(tiny_base, SPEC))
    attacker = Signer(Ed25519PrivateKey.generate()).sign(forged)
    device_transport = broker.client("d1")
    for payload in (forged, attacker):
        device_transport.deliver(Message(Topics("t").global_adapter, payload, True))
    thread, out = _run_in_thread(server)
    # Execute
    with EdgeClient(client_cfg, base=tiny_base, transport=device_transport) as client:
        report = client.run(ClientText("c", ""), data=data)
        stored = client.store.load_adapter()
    thread.join(30)
    reported = [why for device, why in server.registry.refused_pushes() if device == "d1"]
    server.close()
    # Assert: both refused, by name, and reported to the server; the device ran the rounds
    refusals = [r.getMessage() for r in caplog.records if "refused a push" in r.getMessage()]
    assert any("is not signed" in r for r in refusals)
    assert any("not a fleet key" in r for r in refusals)
    assert len(reported) == 2 and "is not signed" in reported[0], reported
    assert [r.accepted for r in out["results"]] == [["d1"], ["d1"]]
    assert [h["round"] for h in report.history] == [1, 2, 2]
    assert report.ppl_final < report.ppl_base
    assert report.bytes_up > 0 and report.bytes_down > 0
    assert codec.decode(stored)[0].version == 2
    assert client.store.pending() == []
    status = json.loads(broker.retained(Topics("t").status("d1")))
    assert status == {"state": "offline"}


def test_server_rebuilds_a_zeroth_order_device_from_its_seeds(tmp_path, tiny_base):
    """Replay: the server's adapter after a seeds-only round equals the device's own."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText

    # Prepare
    broker = MemoryBroker()
    config = ServerConfig(
        fleet="t",
        lora_r=2,
        rounds=1,
        quorum=1,
        round_timeout_s=60,
        zo_pool_size=8,
        state_dir=str(tmp_path / "srv"),
    )
    server = FleetServer(config, tiny_base, transport=broker.client("server"))
    cycle = np.tile(np.arange(16), 40)
    data = ClientData("c", train=cycle[:512].reshape(-1, 16), heldout=cycle[512:].reshape(-1, 16))
    client_cfg = FleetuneConfig(
        device=DeviceConfig(id="d1", state_dir=str(tmp_path / "dev")),
        tuning=TuningConfig(tuner="zo", steps=12, lora_r=2, zo_lr=1e-2),
        sync=SyncConfig(fleet="t", round_wait_s=60),
    )
    thread, out = _run_in_thread(server)
    watcher = broker.client("watcher")
    watcher.connect()
    watcher.subscribe(Topics("t").global_seeds)
    # Execute
    with EdgeClient(client_cfg, base=tiny_base, transport=broker.client("d1")) as client:
        client.run(ClientText("c", ""), data=data)
        tuned_by_device = client.tuned_adapter
    thread.join(30)
    server.close()
    # Assert: the device uploaded 12 seeds, and the server holds exactly what the device tuned
    (result,) = out["results"]
    assert result.accepted == ["d1"]
    for name, value in tuned_by_device.items():
        np.testing.assert_allclose(server.current[name], value, atol=1e-6)
    assert any(np.abs(v).max() > 0 for k, v in server.current.items() if "lora_B" in k)
    seeds_msg = watcher.recv(timeout=1)
    header, body = codec.decode(_verified(server, seeds_msg.payload))
    assert header.encoding == "seeds" and body["seed_index"].max() < 8
    assert len(seeds_msg.payload) < 2048


def test_unseen_device_personalizes_from_the_fleet_basis(tmp_path, tiny_base):
    """Two B-only devices build the basis (an A+B update is refused: it would move the shared
    A); an unseen device mixes it, uploads its coefficients and runs the adapter the server
    pushes back; a redelivered upload is answered once."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText
    from fleetune.edge_sdk.protocol import Basis, Fleet, MixtureUpload, Prior
    from fleetune.edge_sdk.transport.base import Message

    # Prepare: clients whose text cycles through different token ranges
    def data(lo):
        cycle = np.tile(np.arange(lo, lo + 16), 40)
        return ClientData(
            "c", train=cycle[:512].reshape(-1, 16), heldout=cycle[512:].reshape(-1, 16)
        )

    broker = MemoryBroker()
    config = ServerConfig(
        fleet="t",
        lora_r=2,
        rounds=1,
        quorum=2,
        round_timeout_s=60,
        basis_k=2,
        basis_encoding="f32",
        mix_quorum=1,
        state_dir=str(tmp_path / "srv"),
    )
    server = FleetServer(config, tiny_base, transport=broker.client("server"))

    def device(name, **tuning):
        cfg = FleetuneConfig(
            device=DeviceConfig(id=name, state_dir=str(tmp_path / name)),
            tuning=TuningConfig(lora_r=2, batch_size=4, **tuning),
            sync=SyncConfig(fleet="t", round_wait_s=60),
        )
        return EdgeClient(cfg, base=tiny_base, transport=broker.client(name))

    sources = [
        (device("s1", steps=20, lr=5e-2, backprop_params="lora_b"), data(0)),
        (device("s2", steps=20, lr=5e-2, backprop_params="lora_b"), data(40)),
        (device("s3", steps=5, lr=5e-2), data(80)),  # moves A: refused
    ]
    thread, _ = _run_in_thread(server)
    runners = []
    for client, d in sources:
        client.open()
        runners.append(started(client.run, ClientText("c", ""), d, name=client.device))
    for runner in runners:
        runner.join(60)
    for client, _ in sources:
        client.close()
    # Execute: junk coefficients first (refused, the server goes on), then a real device
    junk = broker.client("junk")
    junk.connect()
    basis = Basis.decode(_verified(server, broker.retained(Topics("t").basis)))
    fleet = Fleet(tiny_base, SPEC)
    junk.publish(
        Topics("t").mixture("junk"),
        MixtureUpload("junk", basis.version, np.full((3, 1), 0.5), 1).encode(fleet),
    )
    with device(
        "u1", tuner="mix", steps=30, mix_lr=0.3, mix_patience=5, mix_zo_steps=20, zo_lr=0.1
    ) as client:
        report = client.run(ClientText("c", ""), data=data(0))
        stored = client.store.load_adapter()
    thread.join(30)
    again_coef = np.asarray(json.loads(server.registry.mixtures()[0][2]), np.float32)
    served = server.mixtures_served
    # Assert
    assert basis.k == 2
    assert sorted(server.members) == ["s1", "s2", "u1"]  # the mixture joins the next clustering
    assert report.ppl_local < report.ppl_base and report.ppl_final == pytest.approx(
        report.ppl_local, rel=1e-3
    )  # f16 downlink
    assert 0 < report.bytes_up < 2048  # K coefficients and the 20 warm-start ZO seeds
    header, _ = codec.decode(stored)
    assert header.metrics["basis_version"] == basis.version
    ((device_id, version, coef, loss, cluster),) = server.registry.mixtures()
    assert (device_id, version) == ("u1", basis.version) and loss == pytest.approx(
        np.log(report.ppl_local)
    )
    assert len(json.loads(coef)) == 2 and cluster in (0, 1)
    assert server.registry.refused_mixtures() == [("junk", "mixture coef must be [2, groups]")]
    updates = server.registry.rejections()
    assert [d for _, d, _ in updates] == ["s3"] and "moves LoRA A" in updates[0][2]
    prior = Prior.decode(_verified(server, broker.retained(Topics("t").basis_prior)))
    assert prior.version == basis.version
    np.testing.assert_allclose(prior.prior, again_coef.mean(axis=1), rtol=1e-6)
    # a redelivered mixture (QoS 1) is answered once
    payload = MixtureUpload("u2", basis.version, again_coef, 8).encode(fleet)
    first = server.handle_mixture(Message(Topics("t").mixture("u2"), payload))
    second = server.handle_mixture(Message(Topics("t").mixture("u2"), payload))
    assert (first, second, server.mixtures_served) == (True, False, served + 1)
    server.close()
    # a restarted server still knows the members, the basis and the prior devices start from
    again = FleetServer(config, tiny_base, transport=broker.client("again"))
    assert sorted(again.members) == ["s1", "s2", "u1", "u2"]
    np.testing.assert_array_equal(again.mixtures.bases[basis.version].vectors, basis.vectors)
    np.testing.assert_allclose(again.mixtures.bases[basis.version].prior, again_coef.mean(axis=1))
    again.close()


def _seeds_update(device, index, coef, metrics):
    header = codec.Header(
        kind="update",
        sender=device,
        round=1,
        base_sha256="ab" * 32,
        adapter=SPEC.to_dict(),
        encoding="seeds",
        num_examples=4,
        metrics=metrics,
    )
    body = {"seed_index": np.array(index, np.int32), "coef": np.array(coef, np.float32)}
    return codec.encode(header, body)


def test_seed_updates_out_of_bounds_or_from_another_z_version_are_refused(tmp_path):
    from fleetune.edge_sdk.errors import PayloadError
    from fleetune.edge_sdk.transport.base import Message

    # Prepare
    server = _server(tmp_path, MemoryBroker(), zo_pool_size=8)
    pool = server.pool(1)
    ok = {"pool_seed": pool.pool_seed, "params": "lora_b", "z_version": 2}
    cases = {
        "a seed coefficient exceeds": ([1, 2], [0.01, 5.0], ok),
        "outside the pool of 8": ([8], [0.01], ok),
        "z version 1": ([1], [0.01], {**ok, "z_version": 1}),
        "seeds move 'all'": ([1], [0.01], {**ok, "params": "all"}),
    }
    topic = Topics("t").update("d1")
    # Execute / Assert
    good = server.check_update(
        Message(topic, _seeds_update("d1", [1, 1], [0.01, 0.02], ok)), 1, set()
    )
    assert good.seeds == {1: pytest.approx(0.03)}
    for reason, (index, coef, metrics) in cases.items():
        with pytest.raises(PayloadError, match=reason):
            server.check_update(Message(topic, _seeds_update("d1", index, coef, metrics)), 1, set())
    server.close()


def test_seeds_go_down_only_when_smaller_than_the_dense_adapter(tmp_path):
    # Prepare
    broker = MemoryBroker()
    server = _server(tmp_path, broker, zo_pool_size=4096)
    watcher = broker.client("w")
    watcher.connect()
    watcher.subscribe(Topics("t").global_seeds)
    # Execute: a few seeds, then more seeds than the tiny dense adapter is worth
    few = server.publish_seeds(1, {1: 0.1, 2: 0.2}, dense_bytes=10_000)
    many = server.publish_seeds(1, {i: 0.1 for i in range(2000)}, dense_bytes=10_000)
    # Assert
    assert (few, many) == (True, False)
    assert watcher.recv(timeout=0.5) is not None and watcher.recv(timeout=0.2) is None
    server.close()


@pytest.mark.parametrize(
    ("zo", "reason"),
    [
        ({"pool_seed": -1, "pool_size": 8, "pairs": [[1, 0.1]]}, "pool_seed must be an integer"),
        ({"pool_seed": float("inf"), "pool_size": 8, "pairs": []}, "pool_seed must be an"),
        ({"pool_seed": 3, "pool_size": 8, "pairs": [[9, 0.1]]}, r"seed index .* in 0\.\.7"),
        ({"pool_seed": 3, "pool_size": 8, "pairs": [[1, 2.0]]}, r"exceeds 1\.0"),
        ({"pool_seed": 3, "pool_size": 8, "pairs": [[1, 0.1]] * 2001}, "over the limit of 2000"),
        ("seeds", "must be an object"),
    ],
)
def test_junk_warm_start_seeds_are_a_payload_error(zo, reason):
    from fleetune.edge_sdk.errors import PayloadError
    from fleetune.edge_sdk.protocol import SeedRun

    with pytest.raises(PayloadError, match=reason):
        SeedRun.from_json(zo)


def test_every_message_is_acknowledged_and_an_update_only_once_it_is_on_disk(tmp_path):
    # Prepare: a server transport that records, at each acknowledgement, what is on disk
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=1)
    acks: list[tuple[str, bool]] = []

    def ack(msg):
        saved = [device for device, _ in server.state.accepted(1)[1]]
        acks.append((msg.topic, "/update/" in msg.topic and msg.topic.split("/")[-1] in saved))

    server.transport.ack = ack
    device = broker.client("d")
    device.connect()
    thread, out = _run_in_thread(server)
    # Execute: a junk update, a status, then a good one
    device.publish(Topics("t").update("bad"), b"junk")
    device.publish(Topics("t").status("d1"), b'{"state": "online"}')
    device.publish(Topics("t").update("d1"), _update("d1", 1.0))
    thread.join(20)
    server.close()
    # Assert: all three acknowledged; the good update after it was written, the junk never saved
    assert out["results"][0].accepted == ["d1"]
    assert acks == [
        (Topics("t").update("bad"), False),
        (Topics("t").status("d1"), False),
        (Topics("t").update("d1"), True),
    ]


@pytest.mark.parametrize("tuner", ["window", "zo"])
def test_window_devices_tune_the_top_layers_in_a_round(tmp_path, tiny_base4, tuner):
    """Backprop through a 2-layer window and ZO forwards from the cached prefix, each in a
    real round: the server aggregates an adapter of the top two layers only."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText

    broker = MemoryBroker()
    config = ServerConfig(
        fleet="t",
        lora_r=2,
        lora_window=2,
        rounds=2,
        quorum=1,
        round_timeout_s=60,
        state_dir=str(tmp_path / "srv"),
    )
    server = FleetServer(config, tiny_base4, transport=broker.client("server"))
    cycle = np.tile(np.arange(16), 40)
    data = ClientData("c", train=cycle[:512].reshape(-1, 16), heldout=cycle[512:].reshape(-1, 16))
    tuning = TuningConfig(
        tuner=tuner, steps=30, lr=5e-2, zo_lr=0.5, zo_eps=1e-2, lora_r=2, lora_window=2
    )
    client_cfg = FleetuneConfig(
        device=DeviceConfig(id="d1", state_dir=str(tmp_path / "dev")),
        tuning=tuning,
        sync=SyncConfig(fleet="t", round_wait_s=60, fleet_key=server.signer.public_hex),
    )
    thread, out = _run_in_thread(server)
    # Execute
    with EdgeClient(client_cfg, base=tiny_base4, transport=broker.client("d1")) as client:
        report = client.run(ClientText("c", ""), data=data)
        cached = client.tuner._prefix
    thread.join(60)
    server.close()
    # Assert: two rounds taken; only layers 2 and 3 adapted; the device improved on held-out text
    assert [r.accepted for r in out["results"]] == [["d1"], ["d1"]]
    assert all(".layers.2." in n or ".layers.3." in n for n in server.current)
    train, _, cache = cached  # built once, over the training windows (validation held back)
    assert cache.hidden.shape == (len(train), 16, 32) and len(train) < len(data.train)
    assert report.ppl_final < report.ppl_base


@pytest.mark.parametrize("auto", [False, True], ids=["window2", "budget-picks-2"])
def test_a_round_mixes_full_depth_and_window_devices(tmp_path, tiny_base4, auto):
    """A full-depth backprop device and a device tuning the top 2 of 4 layers in one fleet:
    each tensor is the mean over the devices that tuned it, the window device runs the layers
    below under the fleet's adapter, and rebuilds its prefix cache when they change. With
    ``auto`` the window device's depth is what its memory budget fits (``lora_window = -1``,
    int8 weights, a budget between the estimates of 2 and 3 layers; its cache then goes to
    disk, the budget leaving no room for it)."""
    from fleetune.edge_sdk import memory
    from fleetune.edge_sdk.adapters.lora.io import load_peft
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText

    broker = MemoryBroker()
    config = ServerConfig(
        fleet="t",
        lora_r=2,
        rounds=2,
        quorum=2,
        round_timeout_s=120,
        downlink_encoding="f32",
        state_dir=str(tmp_path / "srv"),
    )
    server = FleetServer(config, tiny_base4, transport=broker.client("server"))
    cycle = np.tile(np.arange(16), 40)
    data = ClientData("c", train=cycle[:512].reshape(-1, 16), heldout=cycle[512:].reshape(-1, 16))
    clients, runs = {}, {}
    key = "torch-int8/backprop/window"
    budget = sum(memory.estimate_mb(key, tiny_base4, 4 * 16, k) for k in (2, 3)) / 2
    for name, tuner, window in (("full", "backprop", 0), ("top2", "window", -1 if auto else 2)):
        tuning = TuningConfig(
            tuner=tuner, steps=8, lr=5e-2, lora_r=2, lora_window=window, seq_len=16
        )
        bounded = {"precision": "int8", "memory_budget_mb": budget} if window == -1 else {}
        client_cfg = FleetuneConfig(
            device=DeviceConfig(id=name, state_dir=str(tmp_path / name), **bounded),
            tuning=tuning,
            sync=SyncConfig(
                fleet="t",
                round_wait_s=120,
                fleet_key=server.signer.public_hex,
                uplink_encoding="f32",
            ),
        )
        clients[name] = EdgeClient(client_cfg, base=tiny_base4, transport=broker.client(name))
        clients[name].open()
        runs[name] = _spy(clients[name])
    thread, out = _run_in_thread(server)
    # Execute: two rounds, both devices in each
    threads = [
        started(lambda n=n: clients[n].run(ClientText(n, ""), data=data), name=n) for n in clients
    ]
    for t in threads:
        t.join(300)
    window = clients["top2"]
    cached, version = window.tuner._prefix[1], window.backend.prefix_version
    on_disk = window.tuner._prefix[2].metrics()["cache_on_disk"]
    for client in clients.values():
        client.close()
    thread.join(60)
    server.close()
    # Assert: v1 = v0 + the full device's change below the window, the mean change in it
    assert [sorted(r.accepted) for r in out["results"]] == [["full", "top2"]] * 2
    v0 = init_lora(SPEC, tiny_base4)
    v1 = load_peft(tmp_path / "srv" / "adapters" / "v0001", tiny_base4)[0]
    (start_f, tuned_f), _ = runs["full"]
    (start_w, tuned_w), _ = runs["top2"]
    assert set(tuned_w) == {n for n in v0 if ".layers.2." in n or ".layers.3." in n}
    for name in v0:
        change_f = tuned_f[name] - start_f[name]
        expected = (change_f + tuned_w[name] - start_w[name]) / 2 if name in tuned_w else change_f
        np.testing.assert_allclose(v1[name] - v0[name], expected, rtol=1e-4, atol=1e-6)
    assert any(np.any(v1[n] != v0[n]) for n in v0 if ".layers.0." in n)
    # the window device's round-2 cache was built under v1's lower layers (version 1 of them;
    # the final adapter's are version 2)
    assert (cached, version) == (1, 2)
    assert window.spec.window == 2 and on_disk == auto


def test_a_replayed_older_adapter_is_refused_and_reported(tmp_path, tiny_base, caplog):
    """A device holding v2 that is sent the fleet's genuinely signed v1 again refuses it."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText
    from fleetune.edge_sdk.protocol import Announcement, DeviceStatus

    # Prepare: the fleet's key signs v2 and v1; the round announcement says the run is done at v2
    broker, topics, fleet = MemoryBroker(), Topics("t"), Fleet(tiny_base, SPEC)
    signer = Signer(Ed25519PrivateKey.generate())
    v1, v2 = (signer.sign(GlobalAdapter(v, _tensors(0.01 * v)).encode(fleet)) for v in (1, 2))
    done = Announcement(round=2, adapter_version=2, base_sha256=tiny_base.sha256, done=True)
    broker.client("server").publish(topics.round, signer.sign(done.encode()), retain=True)
    watcher = broker.client("watcher")
    watcher.subscribe(topics.status("d1"))
    watcher.connect()
    device_transport = broker.client("d1")
    for payload in (v2, v1):  # the newer first, then the replay
        device_transport.deliver(Message(topics.global_adapter, payload))
    config = FleetuneConfig(
        device=DeviceConfig(id="d1", state_dir=str(tmp_path / "d1")),
        tuning=TuningConfig(lora_r=2),
        sync=SyncConfig(fleet="t", round_wait_s=30, fleet_key=signer.public_hex),
    )
    cycle = np.tile(np.arange(16), 16)
    data = ClientData("c", train=cycle[:160].reshape(-1, 16), heldout=cycle[160:].reshape(-1, 16))
    # Execute
    with EdgeClient(config, base=tiny_base, transport=device_transport) as client:
        client.run(ClientText("c", ""), data=data)
        kept = codec.decode(client.store.load_adapter())[0].version
    # Assert: v1 refused by name and reported upstream; the device kept v2
    statuses = []
    while (msg := watcher.recv(timeout=0.1)) is not None:
        statuses.append(DeviceStatus.decode(msg.payload))
    assert kept == 2
    assert any("v1 is older than the v2 held" in s.refused for s in statuses), statuses
    assert any("refused a push" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "start, assign",
    [("served", "direction"), ("cluster", "direction"), ("cluster", "loss")],
    ids=["served", "cluster", "cluster-by-loss"],
)
def test_devices_of_two_kinds_serve_adapters_that_beat_the_global_one(
    tmp_path, tiny_base, start, assign, caplog, monkeypatch
):
    """Two kinds of users (two token languages) on the tiny model: the server pushes cluster
    adapters, each device's canary serves what fits its own text best. With ``start =
    "cluster"`` (IFCA) both devices of a kind tune round 2 from their cluster's adapter; with
    ``cluster_assign = "loss"`` the server publishes every cluster adapter and puts each device
    in the one its canary scored best."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText
    from fleetune.edge_sdk.protocol import PersonalAdapter

    # Prepare: kind A cycles tokens 0..15, kind B a shuffled cycle of 64..95
    caplog.set_level(logging.INFO, logger="fleetune.edge_sdk.rounds")
    caplog.set_level(logging.INFO, logger="fleetune.server.app")
    broker, topics, fleet = MemoryBroker(), Topics("t"), Fleet(tiny_base, SPEC)
    server = _server(
        tmp_path, broker, rounds=2, quorum=4, clusters=2, cluster_assign=assign, round_timeout_s=120
    )
    kinds = {"a": np.arange(16), "b": np.random.default_rng(1).permutation(np.arange(64, 96))}
    thread, out = _run_in_thread(server)
    reports: dict[str, object] = {}

    clients, datasets = {}, {}
    for kind in kinds:
        for i in range(2):
            name = f"{kind}{i}"
            config = FleetuneConfig(
                device=DeviceConfig(id=name, state_dir=str(tmp_path / name)),
                tuning=TuningConfig(steps=8, lr=5e-2, lora_r=2, batch_size=4, seed=i, start=start),
                sync=SyncConfig(fleet="t", round_wait_s=120, fleet_key=server.signer.public_hex),
            )
            tokens = np.tile(kinds[kind], 1024 // len(kinds[kind]))
            datasets[name] = ClientData(
                name, tokens[:768].reshape(-1, 16), tokens[768:].reshape(-1, 16)
            )
            # engines load one at a time (transformers' model init is not thread-safe)
            clients[name] = EdgeClient(config, base=tiny_base, transport=broker.client(name)).open()
    rounds = {name: _spy(client) for name, client in clients.items()}
    pushed_offers = _spy_cluster_offers(monkeypatch)

    def device(name: str) -> None:
        reports[name] = clients[name].run(ClientText(name, ""), data=datasets[name])

    # Execute
    threads = [started(device, name, name=name) for name in clients]
    for t in threads:
        t.join(300)
    for client in clients.values():
        client.close()
    thread.join(60)
    server.close()
    # Assert: every device served its own or its cluster's adapter (or a blend of the two),
    # better than the global one
    assert [len(r.accepted) for r in out["results"]] == [4, 4]
    for name, report in reports.items():
        assert report.served.split(":")[0] in ("local", "cluster", "blend"), (name, report.served)
        assert report.ppl_served < report.ppl_final, (name, report.ppl_served, report.ppl_final)
        assert report.ppl_served < report.ppl_base
        pushed = PersonalAdapter.decode(
            _verified(server, broker.retained(topics.personal(name))), fleet
        )
        assert pushed.version == 2  # the last round's cluster adapter reached the device
    assert server.clusters.of["a0"] == server.clusters.of["a1"] != server.clusters.of["b0"]
    assert server.clusters.of["b0"] == server.clusters.of["b1"]
    # round 1 groups by direction; in round 2 every device's reported losses place it
    logged = [r.getMessage() for r in caplog.records if "by validation loss" in r.getMessage()]
    by_loss = 4 if assign == "loss" else 0
    assert [m.split(": ", 1)[1] for m in logged] == [
        "4 devices in 2 clusters (0 assigned by validation loss)",
        f"4 devices in 2 clusters ({by_loss} assigned by validation loss)",
    ]
    for c in (0, 1):  # every cluster adapter, signed and retained, only when assigned by loss
        published = broker.retained(topics.cluster(c))
        assert (published is not None) == (assign == "loss")
        if published is not None:
            adapter = PersonalAdapter.decode(_verified(server, published), fleet)
            assert (adapter.cluster, adapter.version) == (c, 2)
    began = [r.getMessage() for r in caplog.records if "round 2: perplexity" in r.getMessage()]
    assert len(began) == 4 and all(
        m.endswith(f"from the {start}") == (start == "cluster") for m in began
    )
    if start == "cluster":  # a kind's devices began round 2 from the same adapter, not b's
        second = {name: rounds[name][1][0] for name in clients}
        assert all(np.array_equal(second["a0"][k], second["a1"][k]) for k in second["a0"])
        assert not all(np.array_equal(second["a0"][k], second["b0"][k]) for k in second["a0"])
    # a pushed cluster adapter is weighed with the blend of the device's tuning toward it
    assert pushed_offers and all("blend" in losses for losses in pushed_offers)


def _spy_cluster_offers(monkeypatch) -> list[dict[str, float]]:
    """Record the losses of each canary offer of a pushed cluster adapter alone."""
    from fleetune.edge_sdk.canary import Canary

    losses, offer = [], Canary.offer

    def spy(canary, candidates, version, own=None):
        choice = offer(canary, candidates, version, own)
        if list(candidates) == ["cluster"]:
            losses.append(choice.losses)
        return choice

    monkeypatch.setattr(Canary, "offer", spy)
    return losses


def _spy(client) -> list[tuple[dict, dict]]:
    """Record each round the device tunes: (where it started, what it tuned), in order."""
    rounds, tune = [], client.tuner.tune

    def spy(backend, data, begin, job, progress=None):
        tuned = tune(backend, data, begin, job, progress)
        rounds.append(({k: v.copy() for k, v in begin.items()}, tuned.adapter))
        return tuned

    client.tuner.tune = spy
    return rounds


def _two_languages(tmp_path, tiny_base, **tuning):
    """Two devices that write different token languages, 2 rounds of 8 steps with ``tuning``;
    b has 10x a's training windows (40 and 400), so the FedAvg global leans to b. Returns each
    device's rounds as (start, tuned), the global after round 1 and the final one."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText

    broker = MemoryBroker()
    server = _server(
        tmp_path, broker, rounds=2, quorum=2, round_timeout_s=120, downlink_encoding="f32"
    )
    kinds = {"a": np.arange(16), "b": np.random.default_rng(1).permutation(np.arange(64, 96))}
    clients, datasets, runs = {}, {}, {}
    for name, cycle in kinds.items():
        config = FleetuneConfig(
            device=DeviceConfig(id=name, state_dir=str(tmp_path / name)),
            tuning=TuningConfig(steps=8, lr=5e-2, lora_r=2, batch_size=4, **tuning),
            sync=SyncConfig(
                fleet="t",
                round_wait_s=120,
                fleet_key=server.signer.public_hex,
                uplink_encoding="f32",
            ),
        )
        train = 48 if name == "a" else 408  # windows; the canary takes 8 for validation
        tokens = np.tile(cycle, (train + 16) * 16 // len(cycle))
        datasets[name] = ClientData(
            name, tokens[: train * 16].reshape(-1, 16), tokens[train * 16 :].reshape(-1, 16)
        )
        clients[name] = client = EdgeClient(config, base=tiny_base, transport=broker.client(name))
        client.open()
        runs[name] = _spy(client)
    thread, out = _run_in_thread(server)
    threads = [
        started(lambda n=n: clients[n].run(ClientText(n, ""), data=datasets[n]), name=n)
        for n in clients
    ]
    for t in threads:
        t.join(300)
    for client in clients.values():
        client.close()
    thread.join(60)
    final = dict(server.current)
    server.close()
    assert [len(r.accepted) for r in out["results"]] == [2, 2]
    (_, tuned_a), _ = runs["a"]
    (_, tuned_b), _ = runs["b"]
    first = {k: (40 * tuned_a[k] + 400 * tuned_b[k]) / 440 for k in tuned_a}  # FedAvg, f32
    return runs, first, final


@pytest.mark.parametrize("start", ["served", "global"])
def test_a_round_starts_from_what_the_device_serves_and_uploads_its_change(
    tmp_path, tiny_base, start
):
    """With ``start = "served"`` device a's second round goes on from its own first-round
    adapter (its canary finds it better than a global that leans to b's language); with
    ``start = "global"`` it starts from the global. Either way the server adds the weighted
    mean of the changes the devices made."""
    # Execute
    runs, first, final = _two_languages(tmp_path, tiny_base, start=start)
    # Assert
    (_, tuned_a), (second_a, last_a) = runs["a"]
    (_, (second_b, last_b)) = runs["b"]
    for k in tuned_a:
        expected = tuned_a[k] if start == "served" else first[k]
        np.testing.assert_allclose(second_a[k], expected, atol=1e-4)
        change = (40 * (last_a[k] - second_a[k]) + 400 * (last_b[k] - second_b[k])) / 440
        np.testing.assert_allclose(final[k], first[k] + change, atol=1e-4)


def test_shared_a_personal_b_never_uploads_or_takes_b(tmp_path, tiny_base):
    """FedSA-LoRA (``share = "lora_a"``): the server's B stays at the init (zero); each device's
    second round starts from the fleet's A and its own B."""
    # Execute
    runs, first, final = _two_languages(tmp_path, tiny_base, share="lora_a")
    # Assert
    (_, tuned_a), (second_a, _) = runs["a"]
    for k in tuned_a:
        if ".lora_B." in k:
            assert not final[k].any(), k
            np.testing.assert_array_equal(second_a[k], tuned_a[k])
        else:
            np.testing.assert_allclose(second_a[k], first[k], atol=1e-4)
    assert any(np.abs(tuned_a[k]).max() > 0 for k in tuned_a if ".lora_B." in k)


def _cycle_data():
    """A learnable corpus for the tiny model: a repeated token cycle."""
    from fleetune.edge_sdk.data import ClientData

    tokens = np.tile(np.arange(16), 64)
    return ClientData("a", tokens[:768].reshape(-1, 16), tokens[768:].reshape(-1, 16))


def _device_a(tmp_path, server, steps, privacy=None, **sync):
    """Device "a"'s config against ``server`` (its state in ``tmp_path/device``)."""
    from fleetune.edge_sdk.config import (
        DeviceConfig,
        FleetuneConfig,
        PrivacyConfig,
        SyncConfig,
        TuningConfig,
    )

    return FleetuneConfig(
        device=DeviceConfig(id="a", state_dir=str(tmp_path / "device")),
        tuning=TuningConfig(steps=steps, lr=5e-2, lora_r=2, batch_size=4),
        sync=SyncConfig(fleet="t", round_wait_s=60, fleet_key=server.signer.public_hex, **sync),
        privacy=privacy or PrivacyConfig(),
    )


def test_the_served_adapter_survives_a_restart(tmp_path, tiny_base):
    """A device that restarts offers its canary the adapter it served before (kept on disk);
    the first round after the restart goes on from it."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.data import ClientText

    data = _cycle_data()
    rounds = []

    def run_once(name: str) -> None:
        broker = MemoryBroker()
        server = _server(tmp_path / name, broker, rounds=1, quorum=1, downlink_encoding="f32")
        config = _device_a(tmp_path, server, 8, uplink_encoding="f32")
        thread, _ = _run_in_thread(server)
        with EdgeClient(config, base=tiny_base, transport=broker.client("a")) as client:
            seen = _spy(client)
            client.run(ClientText("a", ""), data=data)
        rounds.extend(seen)
        thread.join(30)
        server.close()

    # Execute: one run, a restart, another run
    run_once("first")
    run_once("second")
    # Assert: the second run started from what the first served: its own tuning (or the global,
    # which with one device and an f32 uplink is the same up to rounding)
    init = init_lora(SPEC, tiny_base)
    (first_start, first_end), (second_start, _) = rounds
    for k in init:
        np.testing.assert_array_equal(first_start[k], init[k])
        np.testing.assert_allclose(second_start[k], first_end[k], atol=1e-6)


def test_a_sparse_uplink_loses_nothing_it_only_delays(tmp_path, tiny_base):
    """``uplink_encoding = "topk:0.1+q8"``: the server decodes the sparse updates, and what top-k
    left out waits on the device (error feedback): the global's change plus the device's residual
    equals the sum of what the device's rounds changed."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.codec.feedback import ErrorFeedback
    from fleetune.edge_sdk.data import ClientText

    # Prepare
    broker = MemoryBroker()
    server = _server(tmp_path, broker, rounds=2, quorum=1, downlink_encoding="f32")
    config = _device_a(tmp_path, server, 6, uplink_encoding="topk:0.1+q8")
    data = _cycle_data()
    thread, out = _run_in_thread(server)
    # Execute
    with EdgeClient(config, base=tiny_base, transport=broker.client("a")) as client:
        rounds = _spy(client)
        client.run(ClientText("a", ""), data=data)
    thread.join(30)
    final = dict(server.current)
    server.close()
    # Assert
    assert [r.accepted for r in out["results"]] == [["a"], ["a"]]
    residual = ErrorFeedback(tmp_path / "device" / "residual.safetensors").residual()
    init = init_lora(SPEC, tiny_base)
    assert any(np.abs(v).max() > 0 for v in residual.values())
    for k in init:
        np.testing.assert_allclose(
            final[k] - init[k] + residual[k],
            sum(end[k] - start[k] for start, end in rounds),
            atol=1e-5,
        )


def test_local_dp_noises_each_upload_and_stops_when_the_budget_is_spent(tmp_path, tiny_base):
    """sigma 2 and a budget of epsilon 3.5 allow two uploads (epsilon 3.19), not a third (4.01):
    the device keeps tuning in round 3 but nothing leaves it; its uploads say only their steps
    and epsilon, no perplexity."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import PrivacyConfig
    from fleetune.edge_sdk.data import ClientText
    from fleetune.edge_sdk.protocol import Update

    # Prepare
    broker = MemoryBroker()
    server = _server(tmp_path, broker, rounds=3, quorum=1, round_timeout_s=4.0)
    watcher = broker.client("watcher")
    watcher.connect()
    watcher.subscribe(Topics("t").all_updates)
    privacy = PrivacyConfig(clip_norm=0.5, noise_multiplier=2.0, epsilon_budget=3.5)
    config = _device_a(tmp_path, server, 4, privacy)
    data = _cycle_data()
    thread, out = _run_in_thread(server)
    # Execute
    with EdgeClient(config, base=tiny_base, transport=broker.client("a")) as client:
        client.run(ClientText("a", ""), data=data)
        releases = client.store.releases()
    thread.join(30)
    server.close()
    uploads = []
    while (msg := watcher.recv(timeout=0.1)) is not None:
        uploads.append(Update.decode(msg.payload, Fleet(tiny_base, SPEC)))
    # Assert
    assert [r.accepted for r in out["results"]] == [["a"], ["a"], []]
    assert releases == 2
    assert [round(u.metrics["epsilon"], 2) for u in uploads] == [2.17, 3.19]
    assert all(set(u.metrics) == {"steps", "epsilon"} for u in uploads)
    for u in uploads:  # clipped to 0.5, then noise of std 1.0 per entry
        assert np.concatenate([v.reshape(-1) for v in u.delta.values()]).std() > 0.8


def test_central_dp_accounts_each_device_and_refuses_one_past_its_budget(tmp_path):
    # Prepare: dp_fedavg, sigma 2, budget 3.5: d1 may take part in two rounds
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    from fleetune.server.broker import free_port
    from fleetune.server.registry import FLEET

    broker, port = MemoryBroker(), free_port()
    server = _server(
        tmp_path,
        broker,
        rounds=3,
        quorum=2,
        strategy="dp_fedavg",
        norm_bound=1.0,
        dp_noise_multiplier=2.0,
        dp_epsilon_budget=3.5,
        metrics_port=port,
        round_timeout_s=3.0,
    )
    device = broker.client("devices")
    device.connect()
    thread, out = _run_in_thread(server)
    # Execute: d1 in every round, d2 in the first only
    for round_ in (1, 2, 3):
        while server.registry.last_round() < round_ and thread.is_alive():
            time.sleep(0.05)  # the round is open
        device.publish(Topics("t").update("d1"), _update("d1", 0.1, round_, version=round_ - 1))
        if round_ == 1:
            device.publish(Topics("t").update("d2"), _update("d2", 0.1, round_))
    thread.join(30)
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    spent = server.registry.privacy()
    server.close()
    # Assert
    assert [r.accepted for r in out["results"]] == [["d1", "d2"], ["d1"], []]
    assert "spent its privacy budget" in out["results"][2].rejected[0][1]
    assert spent["d1"][0] == 2 and spent["d2"][0] == 1 and spent[FLEET][0] == 2
    assert spent["d1"][1] == pytest.approx(3.19, abs=0.01)
    gauges = {
        s.labels["who"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fleetune_privacy_epsilon"
    }
    assert gauges == pytest.approx(
        {"d1": spent["d1"][1], "d2": spent["d2"][1], "fleet": spent[FLEET][1]}
    )


@pytest.mark.parametrize("drop", [False, True])
def test_secure_aggregation_opens_only_the_sum_even_with_a_dropout(tmp_path, tiny_base, drop):
    """Three devices mask their updates; the server's new adapter is the mean of the uploads
    (to the fixed point's step), while no upload alone resembles its device's change. With
    ``drop``, device c masks but its upload is lost: a and b reveal their pair seeds with c and
    the mean of a and b comes out."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText
    from fleetune.edge_sdk.protocol import Update
    from fleetune.edge_sdk.transport.memory import MemoryTransport

    class LosesUpdates(MemoryTransport):
        def publish(self, topic, payload, retain=False, timeout=30.0):
            if "/update/" not in topic:
                super().publish(topic, payload, retain, timeout)

    # Prepare
    broker, topics = MemoryBroker(), Topics("t")
    server = _server(
        tmp_path,
        broker,
        rounds=1,
        quorum=3,
        round_timeout_s=8.0,
        secagg=True,
        downlink_encoding="f32",
    )
    watcher = broker.client("watcher")
    watcher.connect()
    watcher.subscribe(topics.all_updates)
    spied, clients = {}, {}
    for i, name in enumerate("abc"):
        config = FleetuneConfig(
            device=DeviceConfig(id=name, state_dir=str(tmp_path / name)),
            tuning=TuningConfig(steps=4, lr=5e-2, lora_r=2, batch_size=4, seed=i),
            sync=SyncConfig(fleet="t", round_wait_s=60, fleet_key=server.signer.public_hex),
        )
        lossy = drop and name == "c"
        transport = LosesUpdates(broker, name) if lossy else broker.client(name)
        clients[name] = client = EdgeClient(config, base=tiny_base, transport=transport)
        client.open()
        spied[name] = _spy(client)
    tokens = np.tile(np.arange(16), 64)
    data = ClientData("x", tokens[:768].reshape(-1, 16), tokens[768:].reshape(-1, 16))
    thread, out = _run_in_thread(server)
    # Execute
    threads = [
        started(lambda n=n: clients[n].run(ClientText(n, ""), data=data), name=n) for n in clients
    ]
    for t in threads:
        t.join(120)
    for client in clients.values():
        client.close()
    thread.join(60)
    final, init = dict(server.current), init_lora(SPEC, tiny_base)
    server.close()
    changes = {n: {k: end[k] - start[k] for k in start} for n, [(start, end)] in spied.items()}
    uploads = {}
    while (msg := watcher.recv(timeout=0.1)) is not None:
        update = Update.decode(msg.payload, Fleet(tiny_base, SPEC))
        uploads[update.sender] = update
    # Assert
    senders = ["a", "b"] if drop else ["a", "b", "c"]
    assert sorted(uploads) == senders and out["results"][0].version == 1
    for k in init:
        mean = sum(changes[n][k] for n in senders) / len(senders)
        np.testing.assert_allclose(final[k] - init[k], mean, atol=1e-5)
    layout = FlatLayout(SPEC, tiny_base)
    for name, update in uploads.items():
        change = layout.flatten(changes[name])
        seen = update.masked.view(np.int32).astype(np.float64) / 2**20
        assert abs(np.corrcoef(seen, change)[0, 1]) < 0.2 and np.abs(seen).mean() > 100
        assert set(update.metrics) == {"steps"}


def test_a_round_with_pushes_by_reference(tmp_path, tiny_base):
    """``[server] blob_port``: every push above 1 KB goes over HTTP with its sha256 over MQTT;
    the device (``[sync] blob_url``) fetches, checks and verifies it as any push."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.data import ClientText
    from fleetune.server.broker import free_port

    # Prepare
    broker, port = MemoryBroker(), free_port()
    server = _server(tmp_path, broker, rounds=2, quorum=1, blob_port=port, max_message_bytes=1024)
    config = _device_a(tmp_path, server, 4, blob_url=f"http://127.0.0.1:{port}/blobs")
    thread, out = _run_in_thread(server)
    # Execute
    with EdgeClient(config, base=tiny_base, transport=broker.client("a")) as client:
        report = client.run(ClientText("a", ""), data=_cycle_data())
    thread.join(30)
    held = broker.retained(Topics("t").global_adapter)
    server.close()
    # Assert
    assert [r.accepted for r in out["results"]] == [["a"], ["a"]]
    assert held.startswith(b"FLTR") and len(held) < 200
    assert report.ppl_final < report.ppl_base
    assert len(list((tmp_path / "srv" / "blobs").iterdir())) >= 2
