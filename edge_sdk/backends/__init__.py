"""Inference engines behind one protocol. Each loads lazily: importing ``fleetune.edge_sdk``
pulls neither torch nor onnxruntime until a backend is asked for.

An engine says what it can do in :class:`Capabilities`; tuners ask for a capability, never probe
with ``hasattr``. Engines open a device bundle (:mod:`fleetune.edge_sdk.bundle`); only the torch
reference engine runs on a Hugging Face copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fleetune.edge_sdk.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.edge_sdk.bundle import Bundle
    from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Capabilities:
    """What an engine offers beyond the loss of an adapter."""

    backprop: bool = (
        False  # trainable torch parameters and a differentiable loss (TrainableBackend)
    )
    adapter_scales: bool = False  # K adapters loaded once, mixed by their scales (ScaledBackend)
    generate: bool = False  # greedy text generation
    window: bool = False  # a layer window over cached prefix states (WindowBackend)
    streamed_prefix: bool = False  # builds a whole cache layer by layer (prefix_into)
    prefix_adapter: bool = False  # runs the prefix under the fleet's adapter (PrefixAdapted)


@runtime_checkable
class Backend(Protocol):
    """What every tuner and the client need from an engine."""

    capabilities: Capabilities
    base: BaseManifest
    spec: LoraSpec

    def tokenize(self, text: str) -> list[int]: ...
    def set_adapter(self, tensors: Tensors) -> None: ...
    def get_adapter(self) -> Tensors: ...
    def loss(self, input_ids: np.ndarray) -> float:
        """Mean next-token cross-entropy of [batch, seq] windows under the current adapter."""
        ...

    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """The same with the adapter given as a flat vector (what zeroth-order tuning moves)."""
        ...

    def close(self) -> None: ...


class TrainableBackend(Backend, Protocol):
    """``capabilities.backprop``: the torch engine."""

    model: Any

    def trainable(self, part: str = "all") -> list[Any]: ...
    def loss_tensor(self, input_ids: np.ndarray) -> Any: ...


class WindowBackend(Backend, Protocol):
    """``capabilities.window``: the states entering the adapter's layer window, and the loss
    from them (``tuners/window.py``); torch, and ONNX bundles exported with a window."""

    def prefix(self, input_ids: np.ndarray, start: int) -> np.ndarray: ...
    def window_loss_flat(
        self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray
    ) -> float: ...


class StreamedBackend(WindowBackend, Protocol):
    """``capabilities.streamed_prefix``: the layers below the window are not held; a whole
    cache is built layer by layer (``backends/torch_window.py``)."""

    def prefix_into(
        self,
        input_ids: np.ndarray,
        start: int,
        out: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
    ) -> None: ...


class PrefixAdapted(WindowBackend, Protocol):
    """``capabilities.prefix_adapter``: a window device in a fleet whose adapter reaches below
    its window runs the layers below under the fleet's adapter, so the states entering its
    window are the fleet model's (``rounds.use``). ``prefix_version`` changes with them: a
    cache of prefix states is rebuilt when it does."""

    prefix_version: int

    def set_prefix_adapter(self, tensors: Tensors) -> None: ...


def pairs_in_use(tensors: Tensors) -> Tensors:
    """The LoRA pairs of ``tensors`` whose B is not zero (the others change nothing), as
    float32 copies: what a ``PrefixAdapted`` engine keeps and compares."""
    out: Tensors = {}
    for b, value in tensors.items():
        if ".lora_B." in b and np.any(value):
            a = b.replace(".lora_B.", ".lora_A.")
            out[a], out[b] = tensors[a].astype(np.float32), value.astype(np.float32)
    return out


def same_tensors(first: Tensors, second: Tensors) -> bool:
    return first.keys() == second.keys() and all(
        np.array_equal(v, second[k]) for k, v in first.items()
    )


class StatesMemo:
    """The prefix states of windows a window engine scored through its full loss (held-out and
    validation text comes back every round), kept up to ``limit_mb``; beyond that, recomputed."""

    def __init__(self, limit_mb: float = 64) -> None:
        self.limit = limit_mb * 2**20
        self._held: dict[bytes, np.ndarray] = {}

    def get(self, ids: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        key = str(ids.shape).encode() + ids.tobytes()
        hidden = self._held.get(key)
        if hidden is None:
            hidden = compute(ids)
            if sum(h.nbytes for h in self._held.values()) + hidden.nbytes <= self.limit:
                self._held[key] = hidden
        return hidden

    def clear(self) -> None:
        self._held.clear()


class ScaledBackend(Backend, Protocol):
    """``capabilities.adapter_scales``: llama.cpp mixes loaded adapters by their scales."""

    def load_pieces(self, pieces: list[tuple[Tensors, range]]) -> None: ...
    def set_mix(self, scales: np.ndarray) -> None: ...


def load_backend(
    name: str,
    spec: LoraSpec,
    bundle: Bundle | None = None,
    base: BaseManifest | None = None,
    threads: int = 1,
    precision: str = "",
    recompute: bool = False,
) -> Backend:
    """Open the named engine on ``bundle`` (``onnx``, ``llamacpp``) or, for the ``torch``
    reference engine, on ``base``'s Hugging Face copy (``bundle`` may be an ``hf`` bundle); a
    window adapter on torch gets the lean engine that holds only the window and the head
    (``recompute``: its activation checkpointing, for devices under a memory budget)."""
    if name == "onnx":
        try:
            from fleetune.edge_sdk.backends.onnx import OnnxBackend
        except ImportError as err:
            raise BackendUnavailable(
                "the onnx backend needs: pip install 'fleetune[onnx]'"
            ) from err
        if bundle is None:
            raise ConfigError("the onnx backend runs an ONNX bundle: `fleetune export onnx`")
        return OnnxBackend(bundle, base, spec, precision=precision or "fp32", threads=threads)
    if name == "llamacpp":
        from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend

        if bundle is None:
            raise ConfigError("the llamacpp backend runs a GGUF bundle: `fleetune export gguf`")
        bundle.check(base)
        if spec.window:  # the prefix from the base, the window as a GGUF of its own
            from fleetune.edge_sdk.backends.llamacpp_window import LlamaCppWindowBackend

            return LlamaCppWindowBackend(bundle.path("model"), bundle.base, spec, threads)
        return LlamaCppBackend(bundle.path("model"), bundle.base, spec, threads=threads)
    if name == "torch":
        try:
            from fleetune.edge_sdk.backends.torch import TorchBackend
        except ImportError as err:
            raise BackendUnavailable(
                "the torch backend needs: pip install 'fleetune[torch]'"
            ) from err
        if bundle is not None:
            bundle.check(base)
            base = bundle.base
        if base is None:
            raise ConfigError("the torch backend runs a Hugging Face copy: `fleetune export hf`")
        if spec.window:  # holds only the window and the head (backends/torch_window.py)
            from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

            return TorchWindowBackend(base, spec, threads, precision or "fp32", recompute)
        if precision not in ("", "fp32"):
            raise ConfigError(
                f"torch precision {precision!r} is for layer windows only (lora_window = K)"
            )
        return TorchBackend(base, spec, threads=threads)
    raise ConfigError(f"unknown backend {name!r}; available: torch, onnx, llamacpp")
