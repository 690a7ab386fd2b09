"""A fleet you can trust, on the real mosquitto with the configuration ``fleetune fleet provision``
writes: mutual TLS with the fleet's CA, an ACL that confines each device to its own topics, signed
pushes under a rotated key, and retained state and queued updates that survive a broker killed by
SIGKILL."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.client import EdgeClient
from fleetune.edge_sdk.config import FleetuneConfig, SyncConfig, load_config
from fleetune.edge_sdk.errors import TransportError
from fleetune.edge_sdk.protocol import Announcement, Fleet, GlobalAdapter, Update
from fleetune.edge_sdk.signing import Keyring, parse_key
from fleetune.edge_sdk.store import DeviceStore
from fleetune.edge_sdk.transport.base import Message, TlsFiles
from fleetune.edge_sdk.transport.mqtt import MqttTransport
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.app import FleetServer
from fleetune.server.broker import MosquittoBroker, free_port
from fleetune.server.config import load_server_config
from fleetune.server.provision import Provisioned, provision, rotate_key
from tests.conftest import started, tiny_manifest

pytestmark = pytest.mark.integration
FLEET = "trust"
SPEC = LoraSpec(r=2)
TOPICS = Topics(FLEET)
AWS_LIMIT = 128 * 1024


@pytest.fixture
def fleet(tmp_path):
    """A provisioned fleet (devices pi-a, pi-b) and mosquitto running its configuration, with
    AWS IoT Core's limit: payloads over 128 KB are dropped."""
    done = provision(tmp_path / "fleet", FLEET, ["pi-a", "pi-b"], port=free_port())
    tls, limit = done.broker_tls, AWS_LIMIT
    with MosquittoBroker(port=_port(done), tls=tls, message_size_limit=limit) as broker:
        yield done, broker


def _port(done: Provisioned) -> int:
    return int(json.loads((done.root / "fleet.json").read_text())["port"])


def _client(done: Provisioned, who: str, client_id: str | None = None) -> MqttTransport:
    folder = done.root / "server" if who == "server" else done.device_dir(who)
    tls = TlsFiles(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"))
    return MqttTransport("127.0.0.1", _port(done), client_id or f"{FLEET}-{who}", tls=tls)


def _drain(transport: MqttTransport, until: bytes, timeout: float = 20) -> list[Message]:
    """Messages up to (and with) the one whose payload is ``until``."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = transport.recv(timeout=0.2)
        if msg is not None:
            got.append(msg)
            if msg.payload == until:
                return got
    pytest.fail(f"{until!r} did not arrive within {timeout} s; got {[m.topic for m in got]}")


def test_the_acl_confines_each_device_to_its_own_topics(fleet):
    # Prepare: the server holds the retained pushes; pi-a listens to everything it may try
    done, _ = fleet
    server, pi_a, pi_b = (_client(done, who) for who in ("server", "pi-a", "pi-b"))
    server.subscribe(f"fleetune/{FLEET}/#")
    for t in (server, pi_a, pi_b):
        t.connect(timeout=10)
    try:
        server.publish(TOPICS.round, b"server round", retain=True)
        server.publish(TOPICS.global_adapter, b"server adapter", retain=True)
        server.publish(TOPICS.cluster(0), b"server cluster 0", retain=True)
        for topic in (
            TOPICS.round,
            TOPICS.global_adapter,
            TOPICS.all_clusters,  # every cluster's adapter (cluster_assign = "loss")
            TOPICS.personal("pi-a"),
            TOPICS.personal("pi-b"),  # another device's adapter
            TOPICS.all_updates,  # every device's update
            TOPICS.all_status,
        ):
            pi_a.subscribe(topic)
        time.sleep(0.5)  # SUBACKs
        # Execute: the server and pi-b do their part; pi-a tries everything, then its own update
        server.publish(TOPICS.personal("pi-b"), b"for pi-b only")
        pi_b.publish(TOPICS.update("pi-b"), b"pi-b update")
        forged = {
            TOPICS.update("pi-b"): b"pi-a as pi-b",
            TOPICS.round: b"pi-a round",
            TOPICS.global_adapter: b"pi-a adapter",
            TOPICS.personal("pi-a"): b"pi-a personal",
            TOPICS.cluster(1): b"pi-a cluster",
            TOPICS.keys: b"pi-a keys",
            TOPICS.status("pi-b"): b"pi-a as pi-b status",
        }
        for topic, payload in forged.items():
            pi_a.publish(topic, payload, retain=topic != TOPICS.update("pi-b"))
        pi_a.publish(TOPICS.update("pi-a"), b"pi-a update")
        server.publish(TOPICS.personal("pi-a"), b"for pi-a")
        at_server = _drain(server, b"pi-a update")
        at_pi_a = _drain(pi_a, b"for pi-a")
        late = _client(done, "pi-b")
        late.subscribe(TOPICS.round)
        late.subscribe(TOPICS.global_adapter)
        late.connect(timeout=10)
        retained = {m.topic: m.payload for m in (late.recv(10), late.recv(10)) if m is not None}
        late.close()
    finally:
        for t in (server, pi_a, pi_b):
            t.close()
    # Assert: not one forged message reached the server or stuck as retained state
    payloads = {m.payload for m in at_server}
    assert b"pi-b update" in payloads and b"pi-a update" in payloads
    assert not payloads & set(forged.values()), payloads & set(forged.values())
    assert retained == {TOPICS.round: b"server round", TOPICS.global_adapter: b"server adapter"}
    # pi-a read the shared pushes and its own adapter, nobody else's adapter or update
    seen = {(m.topic, m.payload) for m in at_pi_a}
    assert (TOPICS.round, b"server round") in seen
    assert (TOPICS.global_adapter, b"server adapter") in seen
    assert (TOPICS.personal("pi-a"), b"for pi-a") in seen
    assert (TOPICS.cluster(0), b"server cluster 0") in seen
    assert not {p for _, p in seen} & {b"for pi-b only", b"pi-b update"}


def test_payloads_over_the_brokers_limit_travel_in_chunks_through_the_acl(fleet, tmp_path):
    """Loss, duplication and reordering over the real broker; a device that connects late gets a
    retained chunked push; the same payload unchunked never arrives."""
    from fleetune.edge_sdk.transport.chunks import ChunkedTransport, chunk_topic, split

    # Prepare
    done, _ = fleet
    server = ChunkedTransport(_client(done, "server"), AWS_LIMIT, spool=tmp_path / "spool")
    pi_a = ChunkedTransport(_client(done, "pi-a"), AWS_LIMIT)
    server.subscribe(TOPICS.all_updates)
    for t in (server, pi_a):
        t.connect(timeout=10)
    update, again, adapter = os.urandom(600_000), os.urandom(300_000), os.urandom(400_000)
    try:
        # Execute: a chunked update; the same raw (dropped by the broker); a marker
        pi_a.publish(TOPICS.update("pi-a"), update)
        whole = server.recv(timeout=20)
        pi_a.inner.publish(TOPICS.update("pi-a"), update)
        pi_a.publish(TOPICS.update("pi-a"), b"marker")
        after = server.recv(timeout=20)
        # chunks by hand: reversed, one twice, one missing; then the missing one
        manifest, chunks = split(again, AWS_LIMIT)
        topic = TOPICS.update("pi-a")
        for i in [*reversed(range(len(chunks))), 0]:
            if i != 1:
                pi_a.inner.publish(chunk_topic(topic, i), chunks[i])
        pi_a.inner.publish(topic, manifest)
        held = server.recv(timeout=2)
        pi_a.inner.publish(chunk_topic(topic, 1), chunks[1])
        resumed = server.recv(timeout=20)
        # a retained push above the limit, for a device that connects afterwards
        server.publish(TOPICS.global_adapter, adapter, retain=True)
        late = ChunkedTransport(_client(done, "pi-b"), AWS_LIMIT)
        late.subscribe(TOPICS.global_adapter)
        late.connect(timeout=10)
        pushed = late.recv(timeout=20)
        late.close()
    finally:
        for t in (server, pi_a):
            t.close()
    # Assert
    assert whole is not None and whole.payload == update and whole.topic == topic
    assert after is not None and after.payload == b"marker"  # the raw 600 KB never came
    assert held is None and resumed is not None and resumed.payload == again
    assert pushed is not None and pushed.payload == adapter


def test_clients_without_the_fleets_certificate_are_refused(fleet, tmp_path):
    done, broker = fleet
    other = provision(tmp_path / "other", FLEET, ["pi-a"], port=free_port())
    foreign = _client(other, "pi-a")
    foreign.port = broker.port  # another fleet's CA: its certificate proves nothing here
    theirs = other.device_dir("pi-a")  # trusts this broker, but its certificate is another CA's
    mixed = TlsFiles(
        str(done.root / "ca" / "ca.crt"), str(theirs / "client.crt"), str(theirs / "client.key")
    )
    intruder = MqttTransport("127.0.0.1", broker.port, "intruder", tls=mixed)
    plain = MqttTransport("127.0.0.1", broker.port, "plain")  # no TLS at all
    for client, refusal in (
        (foreign, "TLS handshake"),
        (intruder, "TLS handshake|MQTT connect"),
        (plain, "MQTT connect"),
    ):
        with pytest.raises(TransportError, match=refusal):
            client.connect(timeout=5)


def test_a_device_cannot_take_over_the_servers_session(fleet):
    # Prepare: the server's session; pi-a connects under the server's client id
    done, _ = fleet
    server = _client(done, "server")
    server.subscribe(TOPICS.all_updates)
    server.connect(timeout=10)
    impostor = _client(done, "pi-a", client_id=f"{FLEET}-server")
    impostor.connect(timeout=10)
    try:
        # Execute: a device publishes after the impostor connected
        impostor.publish(TOPICS.update("pi-a"), b"after the impostor")
        # Assert: the server's connection still receives (its id was the certificate's name)
        assert _drain(server, b"after the impostor")
    finally:
        impostor.close()
        server.close()


def test_a_round_over_mutual_tls_with_pushes_signed_by_a_rotated_key(fleet, tmp_path):
    # Prepare: the server's key is rotated after the devices were provisioned: pi-a pins the old
    done, _ = fleet
    device_cfg = load_config(done.device_dir("pi-a") / "device.toml")
    new_key, version = rotate_key(done.root / "server" / "signing-key.pem")
    config = load_server_config(done.root / "server" / "server.toml")
    from dataclasses import replace

    config = replace(config, lora_r=2, rounds=1, quorum=1, round_timeout_s=60)
    server = FleetServer(config, tiny_manifest())
    keyring = Keyring([parse_key(device_cfg.sync.fleet_key)])
    tls = device_cfg.sync.tls()
    device = MqttTransport("127.0.0.1", device_cfg.sync.port, "pi-a", tls=tls)
    for topic in (TOPICS.keys, TOPICS.round, TOPICS.global_adapter):
        device.subscribe(topic)
    thread = started(server.run, name="server")
    try:
        device.connect(timeout=10)
        fleet_ = Fleet(tiny_manifest(), SPEC)
        # Execute: the device adopts the rotated key list, verifies the round, sends an update
        adapters: list[GlobalAdapter] = []
        announcement = None
        deadline = time.monotonic() + 60
        while len(adapters) < 2 and time.monotonic() < deadline:
            msg = device.recv(timeout=1)
            if msg is None:
                continue
            if msg.topic == TOPICS.keys:
                assert keyring.rotate(msg.payload)
                continue
            body = keyring.open(msg.payload, msg.topic)
            if msg.topic == TOPICS.global_adapter:
                adapters.append(GlobalAdapter.decode(body, fleet_))
            elif announcement is None:
                announcement = Announcement.decode(body)
                delta = {
                    k: np.full_like(v, 0.5) for k, v in init_lora(SPEC, tiny_manifest()).items()
                }
                update = Update("pi-a", announcement.round, 0, 10, delta=delta)
                device.publish(TOPICS.update("pi-a"), update.encode(fleet_, "f32"))
        thread.join(60)
    finally:
        device.close()
        server.close()
    # Assert: the key list named the new key; the round took pi-a's update over TLS
    assert version == 1 and bytes.fromhex(new_key) in keyring.keys
    assert announcement is not None and announcement.round == 1
    assert [a.version for a in adapters] == [0, 1]
    assert thread.value[0].accepted == ["pi-a"]


def test_a_broker_killed_keeps_retained_state_and_queued_updates(mosquitto, tmp_path):
    # Prepare: the server's retained pushes and its persistent session, then it goes away
    server = MqttTransport(mosquitto.host, mosquitto.port, "srv", manual_ack=True)
    server.subscribe(TOPICS.all_updates)
    server.connect(timeout=10)
    server.publish(TOPICS.round, b"round 3", retain=True)
    server.publish(TOPICS.global_adapter, b"adapter v2", retain=True)
    server.close()
    device_transport = MqttTransport(mosquitto.host, mosquitto.port, "dev")
    device_transport.connect(timeout=10)
    device_transport.publish(TOPICS.update("d1"), b"queued for the server")
    config = FleetuneConfig(sync=SyncConfig(fleet=FLEET, port=mosquitto.port))
    store = DeviceStore(tmp_path / "device")
    device = EdgeClient(config, base=tiny_manifest(), transport=device_transport, store=store)
    # Execute: SIGKILL the broker; the device's next upload fails, then the broker restarts
    mosquitto.kill()
    store.put(TOPICS.update("d1"), b"made while the broker was down")
    with pytest.raises(TransportError):
        device.flush_outbox()
    assert len(store.pending()) == 1  # kept for the next try
    mosquitto.start()
    deadline = time.monotonic() + 30
    while store.pending() and time.monotonic() < deadline:  # paho reconnects by itself
        device.deliver()
        time.sleep(0.2)
    again = MqttTransport(mosquitto.host, mosquitto.port, "srv", manual_ack=True)
    again.subscribe(TOPICS.all_updates)
    again.connect(timeout=10)
    fresh = MqttTransport(mosquitto.host, mosquitto.port, "late-device")
    fresh.subscribe(TOPICS.round)
    fresh.subscribe(TOPICS.global_adapter)
    fresh.connect(timeout=10)
    try:
        updates = {m.payload for m in _drain(again, b"made while the broker was down")}
        retained = {m.topic: m.payload for m in (fresh.recv(10), fresh.recv(10)) if m}
    finally:
        for t in (again, fresh, device_transport):
            t.close()
    # Assert: both updates reached the server; the retained pushes outlived the crash
    assert store.pending() == []
    assert updates >= {b"queued for the server", b"made while the broker was down"}
    assert retained == {TOPICS.round: b"round 3", TOPICS.global_adapter: b"adapter v2"}


SERVER_THAT_DIES = """
import sys, time
from fleetune.edge_sdk.transport.mqtt import MqttTransport
t = MqttTransport("127.0.0.1", int(sys.argv[1]), "srv", manual_ack=sys.argv[2] == "manual")
t.subscribe("fleetune/trust/update/+")
t.connect(timeout=10)
time.sleep(0.5)  # the SUBACK: the subscription is made on connection, after the CONNACK
print("ready", flush=True)
msg = t.recv(timeout=30)
print("got", msg.payload.decode(), flush=True)
time.sleep(600)  # killed before it writes or acknowledges anything
"""


@pytest.mark.parametrize("ack", ["manual", "auto"])
def test_an_update_the_server_died_holding_comes_again_only_if_unacknowledged(mosquitto, ack):
    import subprocess
    import sys

    # Prepare: a server process that receives an update and is killed before it saves it
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_THAT_DIES, str(mosquitto.port), ack],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    device = MqttTransport(mosquitto.host, mosquitto.port, "dev")
    device.connect(timeout=10)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        device.publish(TOPICS.update("d1"), b"the only copy")
        assert proc.stdout.readline().strip() == "got the only copy"
        # Execute: SIGKILL (after paho had time to send an automatic PUBACK), then the server's
        # session comes back
        time.sleep(1.0)
        proc.kill()
        proc.wait(10)
        again = MqttTransport(mosquitto.host, mosquitto.port, "srv", manual_ack=True)
        again.subscribe(TOPICS.all_updates)
        again.connect(timeout=10)
        redelivered = again.recv(timeout=3)
        again.close()
    finally:
        device.close()
        proc.kill()
    # Assert: held unacknowledged, the broker sends it again; acknowledged on arrival, it is gone
    if ack == "manual":
        assert redelivered is not None and redelivered.payload == b"the only copy"
    else:
        assert redelivered is None
