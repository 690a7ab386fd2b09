"""LoRA adapters as GGUF files that stock llama.cpp loads (``--lora``, ``Llama(lora_path=...)``).

Written directly with the ``gguf`` package, ~5 ms for the default adapter, so a device can write a
perturbed adapter to RAM and hot-load it for every zeroth-order evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.errors import BackendUnavailable, ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]
# Hugging Face projection -> llama.cpp tensor, and the heads its output rows are permuted over
GGUF_MODULES = {
    "q_proj": ("attn_q", "num_heads"),
    "k_proj": ("attn_k", "num_kv_heads"),
    "v_proj": ("attn_v", None),
    "o_proj": ("attn_output", None),
    "gate_proj": ("ffn_gate", None),
    "up_proj": ("ffn_up", None),
    "down_proj": ("ffn_down", None),
}


def lora_gguf_tensors(
    tensors: Tensors,
    spec: LoraSpec,
    base: BaseManifest,
    layers: range | None = None,
    first: int = 0,
) -> Tensors:
    """PEFT-named LoRA tensors → llama.cpp names (``blk.{i}.attn_q.weight.lora_a``), float32,
    for the adapter's layers (its window, if it has one) or only ``layers`` (llama.cpp
    leaves the others unadapted); layer ``first`` becomes ``blk.0`` (a GGUF of the window's
    layers alone, ``backends/llamacpp_window.py``).

    Shapes stay as PEFT's (numpy order is GGUF's reversed: lora_a [r, in] is ne = {in, r}). The
    rows of q/k's B are permuted the way ``convert_hf_to_gguf.py`` permutes q/k weights for RoPE.
    """
    if base.architecture != "llama":
        raise ConfigError(f"GGUF LoRA export supports llama bases, not {base.architecture!r}")
    out: Tensors = {}
    for layer in spec.layers(base) if layers is None else layers:
        for module in spec.targets:
            gguf_name, heads_field = GGUF_MODULES[module]
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = np.ascontiguousarray(tensors[f"{prefix}.lora_A.weight"], dtype=np.float32)
            b = np.asarray(tensors[f"{prefix}.lora_B.weight"], dtype=np.float32)
            if heads_field is not None:
                heads = getattr(base, heads_field)
                b = b.reshape(heads, 2, b.shape[0] // heads // 2, b.shape[1]).swapaxes(1, 2)
            out[f"blk.{layer - first}.{gguf_name}.weight.lora_a"] = a
            out[f"blk.{layer - first}.{gguf_name}.weight.lora_b"] = np.ascontiguousarray(
                b.reshape(-1, spec.r)
            )
    return out


def write_lora_gguf(
    tensors: Tensors,
    spec: LoraSpec,
    base: BaseManifest,
    path: str | Path,
    check: bool = True,
    layers: range | None = None,
    first: int = 0,
) -> Path:
    """Write a LoRA adapter (all layers, or only ``layers``) as a GGUF file stock llama.cpp
    loads (``--lora``, ``lora_path``).

    ~5 ms for the default 460,800-parameter adapter on /dev/shm."""
    try:
        import gguf

        logging.getLogger("gguf").setLevel(logging.WARNING)  # it logs every file it writes
    except ImportError as err:
        raise BackendUnavailable("writing GGUF adapters needs: pip install gguf") from err
    if check:
        check_layout(tensors, spec, base)
    path = Path(path)
    writer = gguf.GGUFWriter(path, base.architecture)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(spec.alpha))
        writer.add_string("fleetune.base_sha256", base.sha256)
        for name, value in lora_gguf_tensors(tensors, spec, base, layers, first).items():
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
