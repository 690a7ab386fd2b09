"""Create, check, save and load LoRA adapters without torch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import PARTS
from fleetune.edge_sdk.errors import PayloadError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]


def init_lora(spec: LoraSpec, base: BaseManifest) -> Tensors:
    """A fresh adapter: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from ``spec.init_seed`` (PEFT's
    kaiming-uniform bound), B = 0, so the adapted model starts equal to the base. Every device and
    the server derive the same A from the seed, and a window adapter holds the same A as the
    full-depth one on its layers (drawn in the full layout's order, then kept)."""
    rng = np.random.Generator(np.random.PCG64(spec.init_seed))
    keep = dict(spec.layout(base))
    tensors: Tensors = {}
    for name, shape in replace(spec, window=0).layout(base):
        if name.endswith("lora_A.weight"):
            bound = 1.0 / np.sqrt(shape[1])
            value = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            value = np.zeros(shape, dtype=np.float32)
        if name in keep:
            tensors[name] = value
    return tensors


def check_layout(tensors: Tensors, spec: LoraSpec, base: BaseManifest, part: str = "all") -> None:
    """Raise ``PayloadError`` naming the first tensor missing, extra, misshapen or not finite;
    ``part="lora_a"`` expects the A matrices only (a shared-A update)."""
    marker = PARTS[part]
    expected = {name: shape for name, shape in spec.layout(base) if marker in name}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PayloadError(
            f"adapter does not match the LoRA layout of {base.name}: "
            f"{len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(extra)} unexpected (e.g. {extra[:1]})"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise PayloadError(f"tensor {name} has shape {tensors[name].shape}, expected {shape}")
        if not np.all(np.isfinite(tensors[name])):
            raise PayloadError(f"tensor {name} contains NaN or Inf")


def save_peft(directory: str | Path, tensors: Tensors, spec: LoraSpec, base: BaseManifest) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT can load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "target_modules": list(spec.targets),
        "layers_to_transform": list(spec.layers(base)) if spec.window else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base.hf_dir or base.name,
    }
    # fleetune's own facts ride in the safetensors metadata, where PEFT does not look
    meta = {
        "fleetune_base_sha256": base.sha256,
        "fleetune_base_name": base.name,
        "fleetune_init_seed": str(spec.init_seed),
        "format": "pt",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(directory / "adapter_model.safetensors"),
        metadata=meta,
    )
    return directory


def _window(layers: object, base: BaseManifest) -> int:
    """A window from PEFT's ``layers_to_transform``: none, or the top layers in order."""
    if layers is None:
        return 0
    if isinstance(layers, int):
        layers = [layers]
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"layers_to_transform {layers!r} is not a list of layers")
    window = len(layers)
    if layers != list(range(base.num_layers - window, base.num_layers)):
        raise ValueError(f"layers_to_transform {layers} are not the top layers of {base.name}")
    return window


def load_peft(directory: str | Path, base: BaseManifest) -> tuple[Tensors, LoraSpec]:
    """Load an adapter saved by :func:`save_peft` (or by PEFT with the same layout)."""
    directory = Path(directory)
    weights = directory / "adapter_model.safetensors"
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(weights))
        with safe_open(str(weights), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except (OSError, ValueError) as err:
        raise PayloadError(f"cannot read adapter in {directory}: {err}") from err
    owner = meta.get("fleetune_base_sha256", base.sha256)
    if owner != base.sha256:
        raise PayloadError(
            f"adapter in {directory} belongs to base {owner[:12]}, "
            f"not {base.name} ({base.short_hash})"
        )
    try:
        spec = LoraSpec(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            targets=tuple(config["target_modules"]),
            init_seed=int(meta.get("fleetune_init_seed", 0)),
            window=_window(config.get("layers_to_transform"), base),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PayloadError(
            f"adapter_config.json in {directory} is not a LoRA config: {err}"
        ) from err
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    check_layout(tensors, spec, base)
    return tensors, spec
