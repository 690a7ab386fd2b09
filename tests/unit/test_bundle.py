"""Device bundles: where a device looks, what it says when there is none, what it checks."""

import json

import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.bundle import BUNDLE_MANIFEST, Bundle, default_bundle_dir, open_bundle
from fleetune.edge_sdk.client import EdgeClient
from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig
from fleetune.edge_sdk.errors import ConfigError
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("backend", "command"),
    [
        ("onnx", "fleetune export onnx --base smollm2-135m --out DIR"),
        ("llamacpp", "fleetune export gguf --base smollm2-135m --quant q8_0 --out DIR"),
        ("torch", "fleetune export hf --base smollm2-135m --out DIR"),
    ],
)
def test_a_device_without_a_bundle_is_told_which_command_makes_it(
    backend, command, tmp_path, monkeypatch
):
    # Prepare: an empty cache, so no default bundle either
    monkeypatch.setenv("FLEETUNE_CACHE", str(tmp_path / "cache"))
    config = FleetuneConfig(device=DeviceConfig(backend=backend, state_dir=str(tmp_path / "d")))
    # Execute
    with pytest.raises(ConfigError) as err, EdgeClient(config):
        pass
    # Assert: the device exported nothing and names the fix
    assert command in str(err.value)
    assert not (tmp_path / "cache" / "bundles").exists()


def test_the_default_location_is_where_export_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETUNE_CACHE", str(tmp_path))
    spec = LoraSpec(r=4, targets=("q_proj",))
    assert default_bundle_dir("smollm2-135m", "gguf", quant="q8_0") == (
        tmp_path / "bundles" / "smollm2-135m" / "gguf-q8_0"
    )
    assert default_bundle_dir("/data/ckpt", "onnx", spec).name == "onnx-r4-a16-q_proj"
    with pytest.raises(ConfigError, match="not one of"):
        default_bundle_dir("smollm2-135m", "tflite")


def test_a_bundle_round_trips_without_machine_paths_and_is_checked(tmp_path):
    # Prepare
    base = type(tiny_manifest())(**{**tiny_manifest().__dict__, "hf_dir": "/build/hf"})
    Bundle(tmp_path, "gguf", base, {"model": "model.gguf"}, {"weights": "q8_0"}).write()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    # Execute
    bundle = open_bundle("llamacpp", "tiny", root=str(tmp_path))
    # Assert
    assert bundle.base.sha256 == base.sha256 and bundle.base.hf_dir == ""
    assert bundle.path("model") == tmp_path / "model.gguf"
    assert json.loads((tmp_path / BUNDLE_MANIFEST).read_text())["fleetune_version"]
    other = type(base)(**{**base.__dict__, "sha256": "cd" * 32})
    with pytest.raises(ConfigError, match="was exported from base tiny"):
        bundle.check(other)
    with pytest.raises(ConfigError, match="has no 'decoder' file"):
        bundle.path("decoder")
    with pytest.raises(ConfigError, match="holds a gguf bundle, this device needs onnx"):
        open_bundle("onnx", "tiny", root=str(tmp_path))
