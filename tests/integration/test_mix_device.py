"""Scenario: a mixture device over the in-process broker (tiny model), without a server."""

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.protocol import Fleet, MixtureUpload, PersonalAdapter
from fleetune.edge_sdk.tuners.mix import BASIS_PART, Basis, Mixer

pytestmark = pytest.mark.integration
SPEC = LoraSpec(r=2)


def test_a_mix_device_skips_a_bad_basis_and_keeps_its_own_mix_without_an_answer(
    tmp_path, tiny_base
):
    """No server answers: the device still runs (and has saved) its own mix; a misshapen basis
    before the good one is named and skipped, not kept."""
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
    from fleetune.edge_sdk.data import ClientData, ClientText
    from fleetune.edge_sdk.transport.base import Message
    from fleetune.edge_sdk.transport.memory import MemoryBroker
    from fleetune.edge_sdk.transport.topics import Topics

    # Prepare: a retained prior and a basis whose first adapter fits the text
    pattern = np.tile(np.arange(5, 21), 64)
    windows = np.stack([np.roll(pattern, s)[:16] for s in range(60)])
    data = ClientData("c", train=windows[:48], heldout=windows[48:])
    layout = FlatLayout(SPEC, tiny_base)
    size = layout.indices(BASIS_PART).size
    vectors = np.random.default_rng(0).normal(0, 0.5, (2, size)).astype(np.float32)
    broker, topics = MemoryBroker(), Topics("t")
    server = broker.client("server")
    server.connect()
    server.subscribe(topics.mixture("u1"))
    prior = b'{"version": 2, "prior": [0.25, 0.0], "devices": 1}'
    server.publish(topics.basis_prior, prior, retain=True)
    server.publish(topics.basis, Basis(2, vectors, SPEC, tiny_base.sha256).encode(), retain=True)
    config = FleetuneConfig(
        device=DeviceConfig(id="u1", state_dir=str(tmp_path / "u1")),
        tuning=TuningConfig(tuner="mix", lora_r=2, steps=20, batch_size=4),
        sync=SyncConfig(fleet="t", round_wait_s=2),
    )
    device = broker.client("u1")
    wrong = Basis(1, vectors[:, :5], SPEC, tiny_base.sha256).encode()  # a misshapen basis
    device.deliver(Message(topics.basis, wrong, True))  # arrives before the good basis
    # Execute
    with EdgeClient(config, base=tiny_base, transport=device) as client:
        report = client.run(ClientText("c", ""), data=data)
        saved = PersonalAdapter.decode(client.store.load_adapter(), Fleet(tiny_base, SPEC))
    # Assert: the device mixed basis v2, and runs the mix it saved
    upload = MixtureUpload.decode(server.recv(timeout=1).payload, Fleet(tiny_base, SPEC))
    assert upload.basis_version == 2 and upload.coef.shape == (2, 1)
    assert (saved.basis_version, saved.local) == (2, True)
    assert report.ppl_final == report.ppl_local
    pushed = Basis.decode(broker.retained(topics.basis))  # q8, as the device decoded it
    mixed = Mixer(pushed, tiny_base).adapter(upload.coef)
    assert all(np.array_equal(saved.tensors[k], mixed[k]) for k in mixed)
