"""Where exported engine artifacts live (importable without torch)."""

from __future__ import annotations

from pathlib import Path

from edge_sdk.adapters.lora import LoraSpec
from edge_sdk.manifest import BaseManifest
from models.base import cache_dir


def default_dir(base: BaseManifest, spec: LoraSpec) -> Path:
    """``<cache>/onnx/<base>-<hash>-r<r>-a<alpha>-<targets>``."""
    tag = f"r{spec.r}-a{spec.alpha:g}-{'.'.join(spec.targets)}"
    return cache_dir() / "onnx" / f"{base.name}-{base.short_hash}-{tag}"
