import pytest

from fleetune.edge_sdk.client import EdgeClient
from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig
from fleetune.edge_sdk.errors import TransportError
from fleetune.edge_sdk.store import DeviceStore
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit


class FlakyTransport:
    def __init__(self, fail: bool) -> None:
        self.fail, self.sent = fail, []

    def publish(self, topic, payload, retain=False, timeout=30.0):
        if self.fail:
            raise TransportError("broker 127.0.0.1:1 is down")
        self.sent.append((topic, payload))


def test_device_keeps_its_outbox_when_the_broker_is_down(tmp_path):
    # Prepare
    config = FleetuneConfig(device=DeviceConfig(id="d1", state_dir=str(tmp_path)))
    transport = FlakyTransport(fail=True)
    client = EdgeClient(
        config, base=tiny_manifest(), transport=transport, store=DeviceStore(tmp_path)
    )
    client.store.put("fleetune/default/update/d1", b"update-1")
    # Execute / Assert: the failed send leaves the update queued
    with pytest.raises(TransportError, match="down"):
        client.flush_outbox()
    assert len(DeviceStore(tmp_path).pending()) == 1
    # Execute: the broker is back
    transport.fail = False
    sent = client.flush_outbox()
    # Assert
    assert sent == len(b"update-1") and client.store.pending() == []
    assert transport.sent == [("fleetune/default/update/d1", b"update-1")]


def test_a_device_waiting_for_the_server_delivers_its_outbox_once_the_broker_is_back(
    tmp_path, monkeypatch
):
    # Prepare: an update queued while the broker was down; the broker comes back on the 3rd try
    from fleetune.edge_sdk import client as client_module
    from fleetune.edge_sdk.evaluation import DeviceReport
    from fleetune.edge_sdk.transport.base import Message

    monkeypatch.setattr(client_module, "RETRY_S", 0.01)
    transport = FlakyTransport(fail=True)
    tries = []

    def recv(timeout=None):
        tries.append(timeout)
        transport.fail = len(tries) < 3
        return Message("fleetune/default/round", b"next") if not client.store.pending() else None

    transport.recv = recv
    config = FleetuneConfig(device=DeviceConfig(id="d1"))
    client = EdgeClient(
        config, base=tiny_manifest(), transport=transport, store=DeviceStore(tmp_path)
    )
    client.store.put("fleetune/default/update/d1", b"update-1")
    report = DeviceReport("d1", "c")
    # Execute
    msg = client.next_push(wait=30, report=report)
    # Assert: no TransportError reached the caller; the update went out, then the push came
    assert msg is not None and msg.payload == b"next"
    assert transport.sent == [("fleetune/default/update/d1", b"update-1")]
    assert report.bytes_up == len(b"update-1") and all(t <= 0.01 for t in tries[:3])
