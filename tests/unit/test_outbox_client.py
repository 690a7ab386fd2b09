import numpy as np
import pytest

from edge_sdk import codec
from edge_sdk.adapters.lora import init_lora
from edge_sdk.client import EdgeClient
from edge_sdk.config import DeviceConfig, FleetuneConfig
from edge_sdk.errors import ConfigError, PayloadError, TransportError
from edge_sdk.store import DeviceStore
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
    client = EdgeClient(config, base=tiny_manifest(), transport=FlakyTransport(fail=True))
    client._store = DeviceStore(tmp_path)
    client.store.put("fleetune/default/update/d1", b"update-1")
    # Execute / Assert: the failed send leaves the update queued
    with pytest.raises(TransportError, match="down"):
        client.flush_outbox()
    assert len(DeviceStore(tmp_path).pending()) == 1
    # Execute: the broker is back
    client._transport = FlakyTransport(fail=False)
    sent = client.flush_outbox()
    # Assert
    assert sent == len(b"update-1") and client.store.pending() == []
    assert client._transport.sent == [("fleetune/default/update/d1", b"update-1")]


@pytest.mark.parametrize(
    "payload,error,message",
    [
        (b"{not json", PayloadError, "not JSON"),
        (b"[1, 2]", PayloadError, "lacks integer round"),
        (b'{"round": "1", "adapter_version": 0}', PayloadError, "lacks integer round"),
        (
            b'{"round": 1, "adapter_version": 0, "base_sha256": "' + b"cd" * 32 + b'"}',
            ConfigError,
            "the fleet runs base cdcdcdcdcdcd",
        ),
        (
            b'{"round": 1, "adapter_version": 0, "adapter": {"kind": "lora", "r": 4, "alpha": 16,'
            b' "targets": ["q_proj"]}}',
            ConfigError,
            "the fleet tunes",
        ),
    ],
)
def test_bad_round_announcements_are_named(payload, error, message):
    client = EdgeClient(FleetuneConfig(), base=tiny_manifest())
    with pytest.raises(error, match=message):
        client._read_announcement(payload)
    good = client._read_announcement(b'{"round": 2, "adapter_version": 1}')
    assert good["round"] == 2


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"from_version": 0}, "integer from_version and pool_seed"),
        ({"from_version": 0, "pool_seed": -4}, "pool_seed >= 0"),
        ({"from_version": 0, "pool_seed": 4, "params": "everything"}, "moves 'everything'"),
    ],
)
def test_a_junk_seeds_adapter_is_a_payload_error(tmp_path, metrics, reason):
    from edge_sdk.client import _Global
    from edge_sdk.config import TuningConfig

    # Prepare
    base = tiny_manifest()
    config = FleetuneConfig(
        device=DeviceConfig(id="d", state_dir=str(tmp_path)), tuning=TuningConfig(lora_r=2)
    )
    client = EdgeClient(config, base=base)
    header = codec.Header(
        kind="adapter",
        sender="server",
        round=1,
        base_sha256=base.sha256,
        adapter=client.spec.to_dict(),
        encoding="seeds",
        version=1,
        metrics=metrics,
    )
    body = {"seed_index": np.array([1], np.int32), "coef": np.array([0.1], np.float32)}
    current = _Global(0, init_lora(client.spec, base))
    # Execute / Assert
    with pytest.raises(PayloadError, match=reason):
        client._read_adapter(codec.encode(header, body), current)
