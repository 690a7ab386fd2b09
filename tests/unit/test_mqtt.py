import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fleetune.edge_sdk.errors import TransportError
from fleetune.edge_sdk.transport.mqtt import MqttTransport

pytestmark = pytest.mark.unit


def test_refused_connack_makes_connect_raise_at_once_with_the_reason(monkeypatch):
    # Prepare: no socket; "starting the loop" delivers a CONNACK refusing the client
    transport = MqttTransport("127.0.0.1", 1883, "device-0")
    refused = ReasonCode(PacketTypes.CONNACK, identifier=135)
    client = transport._client
    monkeypatch.setattr(client, "connect", lambda *args, **kwargs: 0)
    monkeypatch.setattr(
        client, "loop_start", lambda: transport._on_connect(client, None, None, refused, None)
    )
    monkeypatch.setattr(client, "loop_stop", lambda: None)
    errors: list[Exception] = []

    def connect() -> None:
        try:
            transport.connect(timeout=600)
        except TransportError as err:
            errors.append(err)

    # Execute
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(30)
    # Assert: it did not sit out its 600 s timeout
    assert not thread.is_alive()
    assert len(errors) == 1
    assert "Not authorized (reason code 135)" in str(errors[0])
