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
