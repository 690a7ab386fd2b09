"""Aggregator workers on a real mosquitto: two workers sharing the update stream fold to what
one worker and the plain server fold, a device's second update counts once, and a second
coordinator waits for the lease."""

import threading
import time

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.errors import PayloadError
from fleetune.edge_sdk.protocol import Announcement, Fleet, SeedRun, Update
from fleetune.edge_sdk.signing import Keyring
from fleetune.edge_sdk.transport.mqtt import MqttTransport
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig
from fleetune.server.workers import AggregatorWorker
from tests.conftest import started, tiny_manifest
from tests.integration.test_server_rounds import SPEC

pytestmark = pytest.mark.integration
TOPICS = Topics("t")


def _config(tmp_path, broker, workers, **kw):
    return ServerConfig(
        fleet="t",
        port=broker.port,
        lora_r=2,
        rounds=2,
        quorum=4,
        round_timeout_s=30,
        workers=workers,
        state_dir=str(tmp_path / f"state-{workers}"),
        **kw,
    )


def _stream(server, round_, version):
    """Round ``round_``'s updates: three dense ones and a ZO seed run."""
    fleet, rng = Fleet(tiny_manifest(), SPEC), np.random.default_rng(round_)
    out = []
    for i, examples in enumerate((10, 30, 5)):
        delta = {
            k: rng.normal(0, 0.01, v.shape).astype(np.float32)
            for k, v in init_lora(SPEC, tiny_manifest()).items()
        }
        body = Update(f"d{i}", round_, version, examples, delta=delta).encode(fleet, "f32")
        out.append((f"d{i}", body))
    pool = server.pool(round_)
    run = SeedRun.from_pairs([(3, 0.02), (9, -0.01), (3, 0.005)], pool.pool_seed, pool.params)
    out.append(("z0", Update("z0", round_, version, 8, seeds=run).encode(fleet)))
    return out


def _federate(tmp_path, broker, workers, extra=()):
    """Two rounds of the same stream; the final adapter and the round results."""
    server = FleetServer(_config(tmp_path, broker, workers), tiny_manifest())
    stop = threading.Event()
    crew = [
        AggregatorWorker(_config(tmp_path, broker, workers), tiny_manifest(), f"w{i}")
        for i in range(workers)
    ]
    helpers = [started(w.run, stop, name=f"worker-{w.name}") for w in crew]
    device = MqttTransport("127.0.0.1", broker.port, f"t-device-{workers}")
    device.subscribe(TOPICS.round)
    device.connect(timeout=10)
    keyring = Keyring([server.signer.public])
    out: dict = {}
    thread = started(lambda: out.setdefault("results", server.run()), name="server")
    try:
        for round_ in (1, 2):
            while True:  # the device hears the round opened, as a device would
                msg = device.recv(timeout=20)
                assert msg is not None, f"no announcement of round {round_}"
                try:  # the retained one of an earlier run on this broker is not this fleet's
                    heard = Announcement.decode(keyring.open(msg.payload, "announcement"))
                except PayloadError:
                    continue
                if heard.round == round_:
                    break
            for name, body in [*_stream(server, round_, round_ - 1), *extra]:
                device.publish(TOPICS.update(name), body)
        thread.join(60)
    finally:
        stop.set()
        for helper in helpers:
            helper.join(20)
        device.close()
        server.close()
    return server.current, out["results"], [w.accepted for w in crew]


def test_two_workers_fold_what_one_worker_and_the_plain_server_fold(tmp_path, mosquitto):
    # Execute: the same stream through 0 (plain server), 1 and 2 workers
    plain, plain_results, _ = _federate(tmp_path, mosquitto, 0)
    one, one_results, _ = _federate(tmp_path, mosquitto, 1)
    two, two_results, shares = _federate(tmp_path, mosquitto, 2)
    # Assert: the same devices counted, the same adapter (float64 partial sums vs FedAvg's
    # float32 accumulation: equal to rounding), the stream split between the two workers
    for results in (plain_results, one_results, two_results):
        assert [sorted(r.accepted) for r in results] == [["d0", "d1", "d2", "z0"]] * 2
        assert [r.version for r in results] == [1, 2]
    for name in plain:
        np.testing.assert_allclose(one[name], two[name], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(plain[name], two[name], rtol=1e-5, atol=1e-7)
    assert sum(shares) == 8 and min(shares) >= 1


def test_a_second_update_of_a_device_counts_once_across_workers(tmp_path, mosquitto):
    # Prepare: d0 sends a second, different update every round
    fleet = Fleet(tiny_manifest(), SPEC)
    again = {k: np.full_like(v, 5.0) for k, v in init_lora(SPEC, tiny_manifest()).items()}
    # Execute (round 1's second update only: round 2's is for the wrong version anyway)
    extra = [("d0", Update("d0", 1, 0, 10, delta=again).encode(fleet, "f32"))]
    _, results, shares = _federate(tmp_path, mosquitto, 2, extra)
    # Assert: d0 counted once in round 1
    assert sorted(results[0].accepted) == ["d0", "d1", "d2", "z0"]
    assert sum(shares) == 8


def test_a_second_coordinator_waits_for_the_lease(tmp_path, mosquitto):
    # Prepare: the first coordinator holds the lease
    config = _config(tmp_path, mosquitto, 1, leader_lease_s=3.0)
    first = FleetServer(config, tiny_manifest())
    second = FleetServer(config, tiny_manifest())
    assert first.coordinator is not None and second.coordinator is not None
    first.coordinator.take_lead()
    # Execute: the second asks while the first renews, then after the first resigns
    began = time.monotonic()
    waiting = started(second.coordinator.take_lead, name="second")
    for _ in range(6):
        time.sleep(0.3)
        first.coordinator.renew()
    still_waiting = waiting.is_alive()
    first.coordinator.resign()
    waiting.join(10)
    # Assert
    assert still_waiting and not waiting.is_alive() and time.monotonic() - began >= 1.8
    first.close()
    second.close()
