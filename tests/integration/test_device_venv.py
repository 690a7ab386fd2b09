"""The deployment promise on real parts: a virtualenv with only ``pip install '.[onnx]'`` (no
torch, no transformers) runs the ``fleetune server`` and ``fleetune device`` commands from a
bundle made beforehand, through mosquitto with the mutual TLS and ACL that ``fleetune fleet
provision`` wrote, every push signed with the fleet key the device pinned."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with fleetune's device extra installed from this checkout (a wheel,
    not an editable install): ~1 min with pip's cache warm."""
    venv = tmp_path_factory.mktemp("device-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[onnx]"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def _provision(bin_dir: Path, folder: Path, port: int, env: dict[str, str]) -> None:
    """``fleetune fleet provision`` as an owner runs it, then the device's config edited for
    this device: the ONNX engine, a short zeroth-order round."""
    done = subprocess.run(
        [
            *(str(bin_dir / "fleetune"), "fleet", "provision", "--out", str(folder)),
            *("--fleet", "venv", "--devices", "pi", "--port", str(port)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    toml = folder / "devices" / "pi" / "device.toml"
    toml.write_text(
        toml.read_text().replace("[device]\n", '[device]\nbackend = "onnx"\nstate_dir = "state"\n')
        + 'round_wait_s = 300\n\n[tuning]\ntuner = "zo"\nsteps = 3\nmax_eval_windows = 4\n'
    )


def test_a_provisioned_device_venv_without_torch_runs_a_round_from_a_bundle(
    device_venv, onnx_artifacts, tmp_path
):
    # Prepare: owner text, a fleet provisioned by the command (mutual TLS, ACL, signing key),
    # mosquitto on its configuration, and an environment whose cache holds nothing
    from fleetune.server.broker import MosquittoBroker, free_port
    from fleetune.server.provision import broker_tls

    bin_dir = device_venv / "bin"
    (tmp_path / "data").mkdir()
    text = "\n".join(
        f"the kitchen pi keeps note {i} about the {i % 7} things it saw" for i in range(300)
    )
    (tmp_path / "data" / "pi.txt").write_text(text)
    env = {"FLEETUNE_CACHE": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"}
    port, fleet = free_port(), tmp_path / "fleet"
    _provision(bin_dir, fleet, port, env)
    broker = MosquittoBroker(port=port, tls=broker_tls(fleet)).__enter__()
    probe = [
        subprocess.run(
            [str(bin_dir / "python"), "-c", f"import {name}"],
            capture_output=True,
            cwd=tmp_path,
        ).returncode
        for name in ("torch", "transformers", "server", "models", "fleetune.edge_sdk")
    ]
    # Execute
    server = subprocess.Popen(
        [
            str(bin_dir / "fleetune"),
            "server",
            "--config",
            str(fleet / "server" / "server.toml"),
            "--base",
            str(onnx_artifacts),
            "--rounds",
            "1",
            "--quorum",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        device = subprocess.run(
            [
                str(bin_dir / "fleetune"),
                "device",
                "--config",
                str(fleet / "devices" / "pi" / "device.toml"),
                "--bundle",
                str(onnx_artifacts),
                "--data",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        out, err = server.communicate(timeout=120)
    finally:
        server.kill()
        broker.close()
    # Assert
    assert probe == [1, 1, 1, 1, 0]  # no torch, nothing generic, the SDK imports
    assert device.returncode == 0, device.stderr[-3000:]
    assert server.returncode == 0, err[-3000:]
    report = json.loads(device.stdout)
    rounds = json.loads(out)
    assert rounds[0]["accepted"] == ["pi"] and rounds[0]["version"] == 1
    assert 0 < report["bytes_up"] < 2048 and report["ppl_final"] != report["ppl_base"]
    assert not (tmp_path / "empty-cache" / "bundles").exists()  # nothing exported or fetched
    assert (fleet / "devices" / "pi" / "state" / "adapter.fltn").exists()  # verified, kept
    assert "refused a push" not in device.stderr
