import logging

import pytest

from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.models.base import read_cached_manifest, write_cached_manifest
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit


def _manifest(hf_dir) -> BaseManifest:
    return tiny_manifest(str(hf_dir))


def test_cached_manifest_round_trips_and_leaves_no_temp_file(tmp_path):
    # Prepare
    (tmp_path / "hf" / "config.json").parent.mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    path = tmp_path / "fleetune-manifest.json"
    # Execute
    write_cached_manifest(path, "10:20", _manifest(tmp_path / "hf"))
    # Assert
    assert read_cached_manifest(path, "10:20") == _manifest(tmp_path / "hf")
    assert read_cached_manifest(path, "10:21") is None  # the source changed: stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleetune-manifest.json", "hf"]


@pytest.mark.parametrize("text", ['{"stamp": "10:20", "manif', "[1, 2]", '{"stamp": "10:20"}'])
def test_corrupt_cached_manifest_is_stale_not_a_crash(tmp_path, caplog, text):
    # Prepare
    path = tmp_path / "fleetune-manifest.json"
    path.write_text(text)
    caplog.set_level(logging.WARNING, logger="fleetune.models.base")
    # Execute
    cached = read_cached_manifest(path, "10:20")
    # Assert
    assert cached is None
    assert "unreadable" in caplog.text
