"""Crash safety on real processes: the server killed by SIGKILL mid-round resumes the round with
every update it had accepted, none counted twice (real mosquitto, the real SQLite file)."""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, load_peft
from fleetune.edge_sdk.protocol import Fleet, Update
from fleetune.edge_sdk.transport.mqtt import MqttTransport
from fleetune.edge_sdk.transport.topics import Topics
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = LoraSpec(r=2)
SERVER = """
import json, logging, sys
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig
from tests.conftest import tiny_manifest

logging.basicConfig(level=logging.INFO)
port, state = int(sys.argv[1]), sys.argv[2]
config = ServerConfig(fleet="crash", port=port, lora_r=2, rounds=1, quorum=3,
                      round_timeout_s=120, state_dir=state)
server = FleetServer(config, tiny_manifest())
results = server.run()
server.close()
print(json.dumps([{"accepted": r.accepted, "version": r.version} for r in results]))
"""


def _server(port: int, state: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(state)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _accepted(state: Path) -> list[str]:
    db = state / "registry.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [d for (d,) in conn.execute("SELECT device FROM updates WHERE accepted = 1")]


def _update(device: str, value: float) -> bytes:
    delta = {k: np.full_like(v, value) for k, v in init_lora(SPEC, tiny_manifest()).items()}
    return Update(device, 1, 0, 10, delta=delta).encode(Fleet(tiny_manifest(), SPEC), "f32")


def test_a_server_killed_mid_round_resumes_it_with_the_updates_it_accepted(mosquitto, tmp_path):
    # Prepare: a server waiting for 3 updates, a device side that publishes them
    state, topics = tmp_path / "srv", Topics("crash")
    first = _server(mosquitto.port, state)
    devices = MqttTransport(mosquitto.host, mosquitto.port, "devices")
    devices.subscribe(topics.round)
    devices.connect(timeout=10)
    try:
        assert devices.recv(timeout=60) is not None, "no round announcement"
        devices.publish(topics.update("d1"), _update("d1", 1.0))
        devices.publish(topics.update("d2"), _update("d2", 2.0))
        deadline = time.monotonic() + 60
        while len(_accepted(state)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Execute: SIGKILL after 2 of 3 accepted updates, restart, the third update arrives
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second = _server(mosquitto.port, state)
        devices.publish(topics.update("d2"), _update("d2", 2.0))  # a resend from an outbox
        devices.publish(topics.update("d3"), _update("d3", 6.0))
        out, err = second.communicate(timeout=180)
    finally:
        devices.close()
        first.kill()
    # Assert: round 1 closed with all three, once each; the adapter is their mean (v1)
    assert second.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == [
        {"accepted": ["d1", "d2", "d3"], "version": 1}
    ]
    assert "round 1 resumed with 2 accepted updates" in err
    assert "a second update from d2" in err
    tensors, _ = load_peft(state / "adapters" / "v0001", tiny_manifest())
    init = init_lora(SPEC, tiny_manifest())
    for name, value in tensors.items():
        np.testing.assert_allclose(value, init[name] + 3.0, atol=1e-5)  # (1 + 2 + 6) / 3
