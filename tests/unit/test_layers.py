"""The package's shape: one namespace, acyclic layers, every package folder installed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "fleetune": "fleetune",
    "edge_sdk": "fleetune.edge_sdk",
    "server": "fleetune.server",
    "models": "fleetune.models",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_device_layer_imports_neither_server_nor_models():
    # Execute
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "edge_sdk").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[:2] in (["fleetune", "server"], ["fleetune", "models"])
        or name.split(".")[0] in ("server", "models", "fleetune.sim")
    }
    # Assert
    assert offending == set()


def test_models_and_server_do_not_import_each_other_the_wrong_way():
    # models builds on the device layer only; the server may read bundles, never the reverse
    for path in (ROOT / "models").rglob("*.py"):
        assert not any(n.startswith(("fleetune.server", "fleetune.sim")) for n in _imports(path))


def test_every_package_folder_is_installed_under_fleetune():
    # Prepare
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Execute
    found = {
        ".".join([FOLDERS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    # Assert
    assert set(config["packages"]) == found
    assert {v: k for k, v in config["package-dir"].items()} == {
        folder: name for folder, name in FOLDERS.items()
    }


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_nothing_generic_is_importable_and_the_sdk_is_light(tmp_path):
    # Execute: outside the repository, as an installed package is used
    generic = [_python(f"import {name}", tmp_path) for name in ("server", "models", "edge_sdk")]
    sdk = _python(
        "import sys, fleetune.edge_sdk, fleetune.edge_sdk.client, fleetune.edge_sdk.protocol\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'fleetune.models',"
        " 'fleetune.server') if m in sys.modules))",
        tmp_path,
    )
    cli = subprocess.run(
        [sys.executable, "-m", "fleetune", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    # Assert
    assert all(r.returncode != 0 and "ModuleNotFoundError" in r.stderr for r in generic)
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == "[]"
    assert cli.returncode == 0 and "export" in cli.stdout and "device" in cli.stdout


@pytest.mark.parametrize("folder", ["edge_sdk", "server", "models", "fleetune"])
def test_no_module_is_long_without_a_reason(folder):
    for path in (ROOT / folder).rglob("*.py"):
        lines = path.read_text().splitlines()
        assert len(lines) <= 400 or "long because" in "\n".join(lines[:5]).lower(), path
