"""The adapter as one flat float32 vector, in ``LoraSpec.layout`` order: what an engine takes as
a graph input and what a zeroth-order tuner perturbs."""

from __future__ import annotations

import math

import numpy as np

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]
PARTS = {"lora_a": ".lora_A.", "lora_b": ".lora_B.", "all": "."}


class FlatLayout:
    def __init__(self, spec: LoraSpec, base: BaseManifest) -> None:
        self.spec, self.base = spec, base
        self.entries: list[tuple[str, tuple[int, ...], int]] = []
        offset = 0
        for name, shape in spec.layout(base):
            self.entries.append((name, shape, offset))
            offset += math.prod(shape)
        self.size = offset

    def flatten(self, tensors: Tensors) -> np.ndarray:
        flat = np.empty(self.size, dtype=np.float32)
        for name, shape, offset in self.entries:
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise PayloadError(f"adapter tensor {name} is missing or not {shape}")
            flat[offset : offset + math.prod(shape)] = tensors[name].reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> Tensors:
        if flat.shape != (self.size,):
            raise PayloadError(f"adapter vector has shape {flat.shape}, expected ({self.size},)")
        return {
            name: flat[offset : offset + math.prod(shape)].reshape(shape).astype(np.float32)
            for name, shape, offset in self.entries
        }

    def indices(self, part: str) -> np.ndarray:
        """Flat positions of the ``lora_a``, ``lora_b`` or ``all`` entries."""
        if part not in PARTS:
            raise ConfigError(f"adapter part {part!r} is not one of {sorted(PARTS)}")
        return np.concatenate(
            [
                np.arange(offset, offset + math.prod(shape))
                for name, shape, offset in self.entries
                if PARTS[part] in name
            ]
        )
