"""Model toolchain (needs the torch extra): resolve a base model, cache a Hugging Face copy,
and write the device bundles an engine opens (``fleetune export onnx|gguf|hf``)."""

from fleetune.models.base import BASES, prepare_base

__all__ = ["BASES", "prepare_base"]
