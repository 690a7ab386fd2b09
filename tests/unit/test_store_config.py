import subprocess
import sys

import pytest

from fleetune.edge_sdk.config import FleetuneConfig, load_config
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.store import DeviceStore

pytestmark = pytest.mark.unit


def test_outbox_survives_a_restart_and_keeps_order(tmp_path):
    # Prepare
    store = DeviceStore(tmp_path)
    store.put("t/1", b"first")
    store.put("t/2", b"\x00second\n")
    # Execute: a new process would open the same directory
    pending = DeviceStore(tmp_path).pending()
    # Assert
    assert [(t, p) for _, t, p in pending] == [("t/1", b"first"), ("t/2", b"\x00second\n")]
    store.done(pending[0][0])
    assert [t for _, t, _ in store.pending()] == ["t/2"]


def test_toml_maps_onto_the_dataclasses(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[device]\nid = "pi-7"\n[tuning]\nsteps = 3\nlora_targets = ["q_proj"]\n'
        '[sync]\nfleet = "home"\nport = 1884\n[server]\nrounds = 9\n'
    )
    config = load_config(path)
    assert config.device.id == "pi-7" and config.tuning.steps == 3
    assert config.tuning.lora_targets == ("q_proj",)
    assert (config.sync.fleet, config.sync.port) == ("home", 1884)
    from fleetune.server.config import load_server_config

    assert load_server_config(path).rounds == 9


@pytest.mark.parametrize(
    "toml,message",
    [
        ("[tuning]\nstep = 3\n", "unknown keys \\['step'\\]"),
        ("[tuning]\nlr = 5.0\n", "lr must be in"),
        ('[device]\nid = "a/b"\n', "device id"),
        ('[sync]\nprotocol = "4"\n', "protocol"),
        ("[sync\n", "cannot read config"),
        ('[tuning]\nstart = "personal"\n', "start 'personal' is not one of"),
        ('[tuning]\nshare = "lora_a"\ntuner = "zo"\n', "FedSA-LoRA.* needs tuner"),
        ('[tuning]\nshare = "lora_a"\nstart = "global"\n', "FedSA-LoRA.* needs"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_defaults_are_valid():
    assert FleetuneConfig().tuning.steps > 0


def test_importing_the_device_core_pulls_no_engine():
    code = (
        "import sys, edge_sdk, edge_sdk.client, edge_sdk.codec, edge_sdk.transport.mqtt; "
        "bad = [m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_fleet_file_loads():
    from pathlib import Path

    from fleetune.server.config import load_server_config

    path = Path(__file__).parents[2] / "examples" / "fleet.toml"
    assert load_config(path).tuning.tuner == "zo"
    assert load_server_config(path).quorum == 2
