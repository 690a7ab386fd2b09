"""A device bundle: everything an engine needs to run a base model on the device, in one folder.

``fleetune export onnx|gguf|hf --out DIR`` (the ``models`` toolchain, which needs torch) writes::

    DIR/fleetune-bundle.json   the one manifest: format, base identity (sha256) and architecture,
                               adapter layout, quantization, files, fleetune version
    DIR/tokenizer.json         the base's tokenizer
    DIR/...                    the graphs (onnx), the GGUF (gguf) or the checkpoint (hf)

A device opens a bundle with numpy + onnxruntime + tokenizers (or llama-cpp-python) only: it never
exports or dequantizes. The server reads the same manifest to know which base updates belong to.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.store import atomic_write

BUNDLE_MANIFEST = "fleetune-bundle.json"
BUNDLE_SCHEMA = 1
FORMATS = ("onnx", "gguf", "hf")
# the backend that runs each bundle format, and the format each backend opens
ENGINE_FORMAT = {"onnx": "onnx", "llamacpp": "gguf", "torch": "hf"}
_MACHINE_FIELDS = ("hf_dir", "source")  # paths of the exporting machine: never in a bundle


def cache_dir() -> Path:
    """``$FLEETUNE_CACHE``, else ``$XDG_CACHE_HOME/fleetune``, else ``~/.cache/fleetune``."""
    if os.environ.get("FLEETUNE_CACHE"):
        return Path(os.environ["FLEETUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fleetune"


def default_bundle_dir(base: str, fmt: str, spec: LoraSpec | None = None, quant: str = "") -> Path:
    """Where ``fleetune export FORMAT`` puts a bundle when no ``--out`` is given, and where a
    device looks for it when its config names none: ``<cache>/bundles/<base>/<format>[-<quant>]``,
    and for ONNX (whose graphs take the adapter as an input) the LoRA spec's tag as well."""
    if fmt not in FORMATS:
        raise ConfigError(f"bundle format {fmt!r} is not one of {FORMATS}")
    name = fmt + (f"-{quant}" if quant else "")
    if fmt == "onnx":
        spec = spec or LoraSpec()
        name += f"-r{spec.r}-a{spec.alpha:g}-{'.'.join(spec.targets)}"
        name += f"-w{spec.window}" if spec.window else ""
    return cache_dir() / "bundles" / Path(base).name / name


def export_command(fmt: str, base: str = "smollm2-135m", quant: str = "") -> str:
    """The command that makes a bundle, for error messages."""
    quant_arg = f" --quant {quant}" if fmt == "gguf" and quant else ""
    return f"fleetune export {fmt} --base {base}{quant_arg} --out DIR"


@dataclass(frozen=True)
class Bundle:
    """A bundle as a device sees it (see the module doc)."""

    root: Path
    format: str  # "onnx" | "gguf" | "hf"
    base: BaseManifest  # identity and architecture; hf_dir is the root for an "hf" bundle
    files: dict[str, str]  # role -> file name; onnx: fp32, int8, decoder; gguf: model
    quantization: dict[str, Any] = field(default_factory=dict)  # e.g. {"weights": "q8_0"}
    adapter: LoraSpec | None = None  # onnx: the spec of the adapter input baked into the graphs
    layout: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)
    tokenizer: str = "tokenizer.json"
    eos_token_id: int | None = None
    fleetune_version: str = ""

    # -- writing (the models toolchain) -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        base = {
            k: v for k, v in json.loads(self.base.to_json()).items() if k not in _MACHINE_FIELDS
        }
        return {
            "schema": BUNDLE_SCHEMA,
            "format": self.format,
            "fleetune_version": self.fleetune_version or _version(),
            "base": base,
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
            "layout": [{"name": n, "shape": list(s), "offset": o} for n, s, o in self.layout],
            "size": sum(math.prod(s) for _, s, _ in self.layout),
            "quantization": self.quantization,
            "files": self.files,
            "tokenizer": self.tokenizer,
            "eos_token_id": self.eos_token_id,
        }

    def write(self) -> Path:
        """Write the manifest last and atomically: a bundle is complete once it has one."""
        path = self.root / BUNDLE_MANIFEST
        atomic_write(path, json.dumps(self.to_dict(), indent=1).encode())
        return path

    # -- reading (the device and the server) ------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, fmt: str | None = None) -> Bundle:
        """Open the bundle in ``root``; a missing or malformed one is a ``ConfigError`` that
        names the command that makes it."""
        root = Path(root)
        path = root / BUNDLE_MANIFEST
        make = export_command(fmt or "onnx|gguf|hf")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"no device bundle in {root} (no {BUNDLE_MANIFEST}): {make}") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}; make it again: {make}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object")
        schema = data.get("schema")
        if schema != BUNDLE_SCHEMA:
            raise ConfigError(
                f"{path} has schema {schema!r}, this fleetune reads {BUNDLE_SCHEMA}: {make}"
            )
        try:
            fmt_found = str(data["format"])
            base = BaseManifest.from_dict(data["base"])
            if fmt_found == "hf":
                base = BaseManifest.from_dict({**data["base"], "hf_dir": str(root.resolve())})
            adapter = None if data.get("adapter") is None else LoraSpec.from_dict(data["adapter"])
            layout = [
                (str(e["name"]), tuple(int(d) for d in e["shape"]), int(e["offset"]))
                for e in data["layout"]
            ]
            bundle = cls(
                root=root,
                format=fmt_found,
                base=base,
                files={str(k): str(v) for k, v in dict(data["files"]).items()},
                quantization=dict(data.get("quantization") or {}),
                adapter=adapter,
                layout=layout,
                tokenizer=str(data.get("tokenizer", "tokenizer.json")),
                eos_token_id=data.get("eos_token_id"),
                fleetune_version=str(data.get("fleetune_version", "")),
            )
        except KeyError as err:
            raise ConfigError(f"malformed {path}: missing key {err.args[0]!r}; {make}") from err
        except (TypeError, ValueError, AttributeError) as err:  # ConfigError is a ValueError
            raise ConfigError(f"malformed {path}: {err}") from err
        if bundle.format not in FORMATS:
            raise ConfigError(f"{path}: format {bundle.format!r} is not one of {FORMATS}")
        if fmt is not None and bundle.format != fmt:
            raise ConfigError(f"{root} holds a {bundle.format} bundle, this device needs {fmt}")
        if data.get("size", 0) != sum(math.prod(s) for _, s, _ in layout):
            raise ConfigError(
                f"malformed {path}: size {data.get('size')!r:.40} is not its layout's"
            )
        return bundle

    def path(self, role: str) -> Path:
        """The file playing ``role``; a ``ConfigError`` if the bundle lacks it."""
        if role not in self.files:
            raise ConfigError(
                f"the {self.format} bundle in {self.root} has no {role!r} file "
                f"(has {sorted(self.files)}): {export_command(self.format, self.base.name)}"
            )
        path = self.root / self.files[role]
        if not path.exists():
            raise ConfigError(f"{path} is missing from the bundle in {self.root}")
        return path

    def check(self, base: BaseManifest | None = None, spec: LoraSpec | None = None) -> None:
        """The device's base and adapter must be the bundle's; the exported layout must be the
        one this SDK derives (both sides flatten the adapter the same way)."""
        if base is not None and base.sha256 != self.base.sha256:
            raise ConfigError(
                f"the bundle in {self.root} was exported from base {self.base.name} "
                f"({self.base.short_hash}), the device runs {base.name} ({base.short_hash})"
            )
        if self.adapter is None:
            return
        if spec is not None and spec != self.adapter:
            raise ConfigError(
                f"the bundle in {self.root} takes a {self.adapter} adapter input, the device "
                f"tunes {spec}: {export_command(self.format, self.base.name)} with that spec"
            )
        if FlatLayout(self.adapter, self.base).entries != self.layout:
            raise ConfigError(
                f"{self.root}: the exported adapter layout differs from {self.adapter} on "
                f"{self.base.name}; make the bundle again: {export_command(self.format)}"
            )


def open_bundle(
    backend: str, base: str, spec: LoraSpec | None = None, precision: str = "", root: str = ""
) -> Bundle:
    """The bundle a device with this config runs: ``root`` if given, else the default location
    for its base, engine and precision (``default_bundle_dir``)."""
    if backend not in ENGINE_FORMAT:
        raise ConfigError(f"unknown backend {backend!r}; available: {sorted(ENGINE_FORMAT)}")
    fmt = ENGINE_FORMAT[backend]
    quant = (precision or "q8_0") if fmt == "gguf" else ""
    where = Path(root) if root else default_bundle_dir(base, fmt, spec, quant)
    if not (where / BUNDLE_MANIFEST).exists():
        raise ConfigError(
            f"the {backend} backend needs a {fmt} bundle and there is none in {where}: make it "
            f"on a machine with the torch extra with `{export_command(fmt, base, quant)}`, copy "
            "DIR to the device and set [device] bundle = DIR"
        )
    return Bundle.load(where, fmt)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetune")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
