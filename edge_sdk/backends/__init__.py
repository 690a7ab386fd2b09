"""Inference engines behind one small protocol. Each loads lazily: importing ``edge_sdk`` pulls
neither torch nor onnxruntime until a backend is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge_sdk.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from edge_sdk.adapters.lora import LoraSpec
    from edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]


class Backend(Protocol):
    """What a tuner and the client need from an engine."""

    def tokenize(self, text: str) -> list[int]: ...
    def set_adapter(self, tensors: Tensors) -> None: ...
    def get_adapter(self) -> Tensors: ...
    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """The same with the adapter given as a flat vector (what zeroth-order tuning moves)."""
        ...

    def loss(self, input_ids: np.ndarray) -> float:
        """Mean next-token cross-entropy of [batch, seq] windows under the current adapter."""
        ...

    def close(self) -> None: ...


def load_backend(
    name: str,
    base: BaseManifest,
    spec: LoraSpec,
    threads: int = 1,
    artifacts: str = "",
    precision: str = "",
) -> Backend:
    """Instantiate the named engine: ``torch`` (reference) or ``onnx`` (``artifacts`` is the
    directory ``fleetune export onnx`` wrote; empty means its default cache location)."""
    if name == "onnx":
        try:
            from edge_sdk.backends.onnx import OnnxBackend
        except ImportError as err:
            raise BackendUnavailable(
                "the onnx backend needs: pip install 'fleetune[onnx]'"
            ) from err
        if not artifacts:
            from models.onnx_paths import default_dir

            artifacts = str(default_dir(base, spec))
        return OnnxBackend(
            artifacts, base=base, spec=spec, precision=precision or "fp32", threads=threads
        )
    if name == "llamacpp":
        from edge_sdk.backends.llamacpp import LlamaCppBackend

        if not artifacts:
            from models.gguf_export import export_base_gguf

            artifacts = str(export_base_gguf(base, precision or "q8_0"))
        return LlamaCppBackend(artifacts, base, spec, threads=threads)
    if name == "torch":
        try:
            from edge_sdk.backends.torch import TorchBackend
        except ImportError as err:
            raise BackendUnavailable(
                "the torch backend needs: pip install 'fleetune[torch]'"
            ) from err
        return TorchBackend(base, spec, threads=threads)
    raise ConfigError(f"unknown backend {name!r}; available: torch, onnx, llamacpp")
