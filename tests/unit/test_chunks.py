"""Payloads above the limit travel in chunks: split, gathered, checked, and survive duplicates,
reordering, corruption, late subscribers and a receiver's restart."""

import logging
import os

import pytest

from fleetune.edge_sdk.transport.base import Message
from fleetune.edge_sdk.transport.chunks import ChunkedTransport, chunk_topic, split
from fleetune.edge_sdk.transport.memory import MemoryBroker

pytestmark = pytest.mark.unit
LIMIT = 4096
TOPIC = "fleetune/t/update/d1"


def _pair(broker=None, **kw):
    broker = broker or MemoryBroker()
    sender = ChunkedTransport(broker.client("d1"), LIMIT)
    receiver = ChunkedTransport(broker.client("server"), LIMIT, **kw)
    for end in (sender, receiver):
        end.connect()
    receiver.subscribe("fleetune/t/update/+")
    return broker, sender, receiver


def test_a_large_payload_arrives_whole_and_no_message_is_over_the_limit():
    # Prepare: a raw listener sees what the broker carries
    broker, sender, receiver = _pair()
    raw = broker.client("watcher")
    raw.connect()
    raw.subscribe("fleetune/#")
    payload = os.urandom(50_000)
    # Execute
    sender.publish(TOPIC, payload)
    sender.publish(TOPIC, b"small")
    # Assert
    assert receiver.recv(timeout=1).payload == payload
    assert receiver.recv(timeout=1).payload == b"small"
    carried = []
    while (msg := raw.recv(timeout=0.1)) is not None:
        carried.append(msg)
    assert len(carried) == 13 + 1 + 1  # chunks, manifest, the small one
    assert max(len(m.payload) for m in carried) <= LIMIT


def test_duplicates_and_any_order_are_harmless():
    # Prepare
    _, _, receiver = _pair()
    payload = os.urandom(20_000)
    manifest, chunks = split(payload, LIMIT)
    messages = [Message(chunk_topic(TOPIC, i), c) for i, c in enumerate(chunks)]
    messages = [*messages[::-1], messages[2], Message(TOPIC, manifest), messages[0]]
    inner = receiver.inner
    # Execute
    for msg in messages:
        inner.deliver(msg)
    got = receiver.recv(timeout=1)
    # Assert: one whole message, then nothing (the late duplicate starts a transfer that waits)
    assert got is not None and got.payload == payload and got.topic == TOPIC
    assert receiver.recv(timeout=0.2) is None


def test_a_corrupt_chunk_waits_for_a_good_copy(caplog):
    _, _, receiver = _pair()
    payload = os.urandom(10_000)
    manifest, chunks = split(payload, LIMIT)
    bad = chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])
    for i, chunk in enumerate([chunks[0], bad, chunks[2]]):
        receiver.inner.deliver(Message(chunk_topic(TOPIC, i), chunk))
    receiver.inner.deliver(Message(TOPIC, manifest))
    with caplog.at_level(logging.WARNING):
        assert receiver.recv(timeout=0.3) is None
    assert any("does not match its manifest" in r.getMessage() for r in caplog.records)
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 1), chunks[1]))
    assert receiver.recv(timeout=1).payload == payload


def test_an_incomplete_transfer_resumes_from_the_missing_chunk_or_times_out(caplog):
    _, _, receiver = _pair()
    receiver.timeout_s = 0.5
    payload = os.urandom(10_000)
    manifest, chunks = split(payload, LIMIT)
    receiver.inner.deliver(Message(TOPIC, manifest))
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 0), chunks[0]))
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 2), chunks[2]))
    assert receiver.recv(timeout=0.1) is None
    # the missing chunk alone completes it
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 1), chunks[1]))
    assert receiver.recv(timeout=1).payload == payload
    # a transfer that never completes is dropped, by name
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 0), chunks[0]))
    with caplog.at_level(logging.WARNING):
        assert receiver.recv(timeout=0.7) is None
        assert receiver.recv(timeout=0.1) is None
    assert any("incomplete after" in r.getMessage() for r in caplog.records)
    assert receiver._transfers == {}


@pytest.mark.parametrize(
    "topic,payload",
    [
        (chunk_topic(TOPIC, 0), b"FLTC" + b"\0" * 10),
        (
            chunk_topic(TOPIC, 5),
            b"FLTC" + b"\0" * 32 + (5).to_bytes(4, "big") + (2).to_bytes(4, "big"),
        ),
        (TOPIC, b"FLTM{not json"),
        (TOPIC, b'FLTM{"sha256": "ab", "size": 1, "chunks": []}'),
    ],
)
def test_junk_chunks_are_dropped_by_name_and_the_receiver_goes_on(topic, payload, caplog):
    _, sender, receiver = _pair()
    receiver.inner.deliver(Message(topic, payload))
    sender.publish(TOPIC, b"next")
    with caplog.at_level(logging.WARNING):
        assert receiver.recv(timeout=1).payload == b"next"
    assert any("dropped a chunk message" in r.getMessage() for r in caplog.records)


def test_a_late_subscriber_gets_a_retained_chunked_message_and_stale_chunks_are_cleared():
    # Prepare
    broker = MemoryBroker()
    server = ChunkedTransport(broker.client("server"), LIMIT)
    server.connect()
    topic = "fleetune/t/adapter/global"
    payload = os.urandom(30_000)
    # Execute: publish retained, then a device connects
    server.publish(topic, payload, retain=True)
    device = ChunkedTransport(broker.client("d1"), LIMIT)
    device.connect()
    device.subscribe(topic)
    got = device.recv(timeout=1)
    server.publish(topic, b"a small adapter", retain=True)
    # Assert
    assert got is not None and got.payload == payload and got.retained
    assert broker.retained(topic) == b"a small adapter"
    assert all(broker.retained(chunk_topic(topic, i)) is None for i in range(8))


def test_spooled_chunks_survive_a_restart_and_go_once_acknowledged(tmp_path):
    # Prepare: a receiver that spools, as the server does
    broker, _, receiver = _pair(spool=tmp_path / "chunks")
    payload = os.urandom(10_000)
    manifest, chunks = split(payload, LIMIT)
    receiver.inner.deliver(Message(TOPIC, manifest))
    receiver.inner.deliver(Message(chunk_topic(TOPIC, 0), chunks[0]))
    assert receiver.recv(timeout=0.1) is None
    # Execute: a restart, then the rest
    restarted = ChunkedTransport(broker.client("server"), LIMIT, spool=tmp_path / "chunks")
    for i in (1, 2):
        restarted.inner.deliver(Message(chunk_topic(TOPIC, i), chunks[i]))
    got = restarted.recv(timeout=1)
    spooled = list((tmp_path / "chunks").glob("*/*"))
    restarted.ack(got)
    # Assert
    assert got.payload == payload
    assert len(spooled) == 4  # manifest + 3 chunks, until the whole is acknowledged
    assert list((tmp_path / "chunks").glob("*")) == []


# -- pushes by reference (the AWS IoT Jobs pattern) ----------------------------------------------


def test_a_push_by_reference_carries_a_sha256_and_the_device_fetches_and_checks_it(
    tmp_path, caplog
):
    from fleetune.server.blobs import BlobServer

    # Prepare
    broker, topic = MemoryBroker(), "fleetune/t/adapter/global"
    blobs = BlobServer(tmp_path / "blobs")
    server = ChunkedTransport(broker.client("server"), LIMIT, blobs=blobs)
    device = ChunkedTransport(broker.client("d1"), LIMIT, blob_url=blobs.url)
    careless = ChunkedTransport(broker.client("d2"), LIMIT)  # no blob_url
    payload = os.urandom(300_000)
    try:
        # Execute
        server.publish(topic, payload, retain=True)
        for end in (device, careless):
            end.connect()
            end.subscribe(topic)
        got = device.recv(timeout=5)
        with caplog.at_level(logging.WARNING):
            missed = careless.recv(timeout=0.3)
    finally:
        blobs.close()
    # Assert: MQTT held 78 bytes, not 300 KB
    assert len(broker.retained(topic)) < 100
    assert got is not None and got.payload == payload and got.retained
    assert missed is None
    assert any("no blob_url is configured" in r.getMessage() for r in caplog.records)


def test_a_blob_that_does_not_match_is_refused_and_a_missing_one_is_fetched_again(tmp_path):
    from fleetune.edge_sdk.transport.blobs import reference
    from fleetune.server.blobs import BlobServer

    blobs = BlobServer(tmp_path / "blobs")
    try:
        _, _, receiver = _pair(blob_url=blobs.url)
        good, bad = os.urandom(5000), os.urandom(5000)
        # a tampered blob: the server's file does not hash to the reference
        (tmp_path / "blobs" / reference(good)[4:].split(b'"')[3].decode()).write_bytes(bad)
        receiver.inner.deliver(Message(TOPIC, reference(good)))
        assert receiver.recv(timeout=0.5) is None
        # a blob not there yet: fetched again on a later recv, once it is
        later = os.urandom(6000)
        receiver.inner.deliver(Message(TOPIC, reference(later)))
        assert receiver.recv(timeout=0.5) is None
        blobs.put(later)
        got = receiver.recv(timeout=0.5)
    finally:
        blobs.close()
    assert got is not None and got.payload == later
