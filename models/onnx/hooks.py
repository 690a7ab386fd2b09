"""The LoRA path as forward hooks on the target ``nn.Linear`` modules, fed from a flat adapter
tensor: no PEFT at export time, and the traced graph sees the adapter as a graph input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout


def unflatten(flat: torch.Tensor, layout: FlatLayout) -> dict[str, torch.Tensor]:
    """Split a flat ``[N]`` tensor into ``{peft_key: view}`` by the layout's offsets."""
    if flat.shape[0] != layout.size:
        raise ValueError(f"adapter has {flat.shape[0]} values, layout needs {layout.size}")
    return {
        name: flat[offset : offset + math.prod(shape)].reshape(shape)
        for name, shape, offset in layout.entries
    }


class LoraHooks(nn.Module):
    """Wraps a causal LM: while :meth:`adapter` is active, each hooked projection adds
    ``scale * (x @ A.T) @ B.T`` from the current flat adapter."""

    def __init__(self, model: nn.Module, layout: FlatLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.scale = float(layout.spec.scale)
        self._current: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for name, _, _ in layout.entries:
            if name.endswith(".lora_A.weight"):
                prefix = name[: -len(".lora_A.weight")]
                linear = modules[prefix[len("base_model.model.") :]]
                linear.register_forward_hook(self._hook(prefix))

    def _hook(self, prefix: str):
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor):
            a = self._current[f"{prefix}.lora_A.weight"]
            b = self._current[f"{prefix}.lora_B.weight"]
            return out + self.scale * F.linear(F.linear(args[0], a), b)

        return hook

    @contextmanager
    def active(self, adapter: torch.Tensor) -> Iterator[None]:
        """The hooked projections take their LoRA path from ``adapter`` inside the block."""
        self._current = unflatten(adapter, self.layout)
        try:
            yield
        finally:
            self._current = {}

    def run(self, adapter: torch.Tensor, **inputs):
        """The wrapped model's forward with the LoRA path taken from ``adapter``."""
        with self.active(adapter):
            return self.model(**inputs)
