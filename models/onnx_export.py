"""``fleetune export onnx``: a causal LM + flat LoRA adapter vector to ONNX, int8-quantized.

The exported graphs take the LoRA adapter as ONE flat float32 graph input
(``adapter``, shape ``[N]``) while all base weights are baked in as
initializers. This lets an on-device runtime evaluate (or, via finite
differences / zeroth-order methods, train) any adapter without re-exporting.

Flat adapter layout (``LoraSpec.layout``): for each layer ``i`` and each
target module ``m`` (in ``targets`` order) the tensors
``...layers.{i}.self_attn.{m}.lora_A.weight`` ``(r, in_features)`` followed by
``...lora_B.weight`` ``(out_features, r)``, each flattened row-major. Names are
PEFT's keys as stored in ``adapter_model.safetensors``, so a flat vector can be
converted to a PEFT checkpoint with :func:`unflatten_adapter`.

LoRA forward: ``y = W x + scale * B (A x)`` with ``scale = alpha / r``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from edge_sdk.adapters.lora import LoraSpec
from edge_sdk.manifest import BaseManifest
from models.onnx_paths import default_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

AdapterLayout = list[tuple[str, tuple[int, ...]]]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- #
# Flat adapter helpers (the order is LoraSpec.layout's)
# --------------------------------------------------------------------------- #
def adapter_size(layout: AdapterLayout) -> int:
    """Total number of scalars ``N`` in the flat adapter vector."""
    return sum(math.prod(shape) for _, shape in layout)


def unflatten_adapter(flat: torch.Tensor, layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """Split a flat ``[N]`` vector into ``{peft_key: tensor}`` (views, no copy)."""
    out: dict[str, torch.Tensor] = {}
    off = 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = flat[off : off + n].reshape(shape)
        off += n
    if off != flat.shape[0]:
        raise ValueError(f"adapter has {flat.shape[0]} values, layout needs {off}")
    return out


# --------------------------------------------------------------------------- #
# LoRA wrapper used for export
# --------------------------------------------------------------------------- #
class _LoRAFunctionalLM(nn.Module):
    """Causal LM whose LoRA weights come from a flat ``adapter`` tensor.

    Hand-written LoRA via forward hooks on the target ``nn.Linear`` modules
    (no PEFT dependency at export time): the hook adds
    ``scale * (x @ A.T) @ B.T`` to the projection output. The current A/B
    tensors are set right before the base model is called, so the traced graph
    sees them as (sliced) graph inputs rather than constants.
    """

    def __init__(self, model: nn.Module, layout: AdapterLayout, scale: float) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.scale = float(scale)
        self._current: dict[str, torch.Tensor] = {}
        self._targets: list[str] = []  # PEFT base names, one per hooked linear
        modules = dict(model.named_modules())
        for name, _ in layout:
            if not name.endswith(".lora_A.weight"):
                continue
            base = name[: -len(".lora_A.weight")]
            hf_name = base[len("base_model.model.") :]
            linear = modules[hf_name]
            linear.register_forward_hook(self._make_hook(base))
            self._targets.append(base)

    def _make_hook(self, base: str):
        def hook(
            _mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
        ) -> torch.Tensor:
            a = self._current[f"{base}.lora_A.weight"]
            b = self._current[f"{base}.lora_B.weight"]
            return out + self.scale * F.linear(F.linear(args[0], a), b)

        return hook

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: torch.Tensor
    ) -> torch.Tensor:
        self._current = unflatten_adapter(adapter, self.layout)
        try:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        finally:
            self._current = {}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, shifted like HF ``ForCausalLMLoss``.

    Position ``t`` predicts ``labels[t + 1]``; labels equal to -100 are ignored.
    """
    v = logits.shape[-1]
    shift_logits = logits[:, :-1, :].float().reshape(-1, v)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="mean")


class LossGraph(nn.Module):
    """``(input_ids, attention_mask, labels, adapter) -> loss`` (scalar)."""

    def __init__(self, inner: _LoRAFunctionalLM) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapter: torch.Tensor,
    ) -> torch.Tensor:
        return causal_lm_loss(self.inner.logits(input_ids, attention_mask, adapter), labels)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def _load_base(hf_dir: str | os.PathLike[str]) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    out_path: str | os.PathLike[str],
    opset: int,
) -> Path:
    """Dynamo-export ``module`` with dynamic batch/sequence dims on token inputs."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dynamic_shapes = {
        name: ({0: batch, 1: seq} if name != "adapter" else None) for name in input_names
    }
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            external_data=True,
        )
    if program is None:  # only None when `f` is given; kept for type-checkers
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    # Weights go to ``<out_path>.data`` (external data, referenced by relative path).
    program.save(str(out_path), external_data=True)
    return out_path


def _example_inputs(
    n_adapter: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    adapter = torch.randn(n_adapter, generator=g) * 0.02
    return ids, mask, ids.clone(), adapter


def export_loss_graph(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    layout: AdapterLayout,
    scale: float = 2.0,
    opset: int = 18,
) -> Path:
    """Export ``loss = CE(model_with_lora(input_ids, attention_mask), labels)``.

    Inputs: ``input_ids``/``attention_mask``/``labels`` int64 ``[B, T]``
    (dynamic), ``adapter`` float32 ``[N]``. Output: scalar float32 ``loss``.
    Base weights are initializers stored as external data next to ``out_path``
    (``<out_path>.data``).
    """
    model = _load_base(hf_dir)
    graph = LossGraph(_LoRAFunctionalLM(model, layout, scale)).eval()
    ids, mask, labels, adapter = _example_inputs(adapter_size(layout), model.config.vocab_size)
    return _export(
        graph,
        (ids, mask, labels, adapter),
        ["input_ids", "attention_mask", "labels", "adapter"],
        ["loss"],
        out_path,
        opset,
    )


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(input_names, output_names)`` of the decoder graph, in graph order."""
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *past, "adapter"]
    return inputs, ["logits", *present]


class DecoderGraph(nn.Module):
    """``(input_ids, attention_mask, position_ids, past, adapter) -> (logits, *present)``.

    ``past`` is the tuple ``(key_0, value_0, key_1, value_1, ...)`` (flattened to the graph
    inputs ``past.{i}.key`` / ``past.{i}.value``); it fills a ``DynamicCache`` that the
    model extends by the ``T`` new positions, returned flattened in the same order.
    """

    def __init__(self, inner: _LoRAFunctionalLM, num_layers: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_layers = num_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        adapter: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        inner = self.inner
        inner._current = unflatten_adapter(adapter, inner.layout)
        try:
            out = inner.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            inner._current = {}
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_decoder_graph(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    layout: AdapterLayout,
    scale: float = 2.0,
    opset: int = 18,
) -> Path:
    """Export the KV-cache decoder step (see the module docstring for the graph I/O).

    One graph serves both prefill (``P = 0``: empty ``past.*`` tensors) and decoding
    (``T = 1``). ``logits`` holds the last position only (``[B, 1, V]``).
    Base weights go to ``<out_path>.data`` (external data).
    """
    model = _load_base(hf_dir)
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    graph = DecoderGraph(_LoRAFunctionalLM(model, layout, scale), n_layers).eval()

    g = torch.Generator().manual_seed(0)
    batch_size, new_len, past_len = 2, 3, 5  # > 1 so that no dim is specialized
    ids = torch.randint(0, int(cfg.vocab_size), (batch_size, new_len), generator=g)
    mask = torch.ones(batch_size, past_len + new_len, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + new_len).expand(batch_size, -1).contiguous()
    past = [
        torch.randn(batch_size, kv_heads, past_len, head_dim, generator=g)
        for _ in range(2 * n_layers)
    ]
    adapter = torch.randn(adapter_size(layout), generator=g) * 0.02

    input_names, output_names = decoder_io_names(n_layers)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    past_seq = torch.export.Dim("past", min=0)
    total = torch.export.Dim("total")  # P + T; torch.export only derives dims from one Dim
    kv_spec = {0: batch, 2: past_seq}
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple([kv_spec] * (2 * n_layers)),
        None,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (ids, mask, pos, tuple(past), adapter),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            external_data=True,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.save(str(out_path), external_data=True)
    return out_path


# --------------------------------------------------------------------------- #
# Quantization
# --------------------------------------------------------------------------- #
def _fold_initializer_transposes(model) -> int:
    """Replace ``Transpose(initializer)`` nodes by a pre-transposed initializer.

    The dynamo exporter keeps tied ``lm_head`` weights as one initializer
    feeding both ``Gather`` (embedding) and ``Transpose -> MatMul`` (LM head).
    A MatMul fed by a Transpose has no constant B, so ``quantize_dynamic``
    would leave the LM head (~21% of SmolLM2-135M's weights) in fp32. Folding
    the Transpose un-ties the weight so both uses can be quantized.
    Returns the number of folded nodes.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[node.input[0]])
            arr = np.ascontiguousarray(np.transpose(arr, perm))
            graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


QuantMethod = Literal["weight_only", "dynamic"]


def quantize_int8(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    method: QuantMethod = "weight_only",
    block_size: int = 32,
    symmetric: bool = False,
    quantize_embedding: bool = True,
) -> Path:
    """Int8-quantize the base weights of an exported graph; LoRA path stays fp32.

    Both methods first load ``in_path`` with its external data
    (``<in_path>.data``) and fold ``Transpose(initializer)`` so the tied LM
    head becomes a constant MatMul weight (see
    :func:`_fold_initializer_transposes`). Only MatMuls whose B operand is a
    constant initializer are touched, so every MatMul fed by the ``adapter``
    graph input (the LoRA A/B products) stays fp32.

    ``method``:

    * ``"weight_only"`` (default, recommended): ``MatMulNBitsQuantizer`` with
      ``bits=8`` -> ``com.microsoft.MatMulNBits`` (block-wise int8 weights,
      fp32 activations). Loss within ~0.01 of fp32 on SmolLM2-135M.
    * ``"dynamic"``: ``quantize_dynamic`` (QOperator ``MatMulInteger``, int8
      per-tensor weights, uint8 dynamic per-tensor activations). Smaller and
      faster but **inaccurate** for SmolLM2-135M (loss +1.5 nats) because of
      activation outliers; kept for comparison. ``quantize_embedding`` also
      quantizes the embedding ``Gather`` table in this mode.

    The result (~160-260 MB for SmolLM2-135M) is written as a single file.
    """
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(in_path), load_external_data=True)
    _fold_initializer_transposes(model)

    if method == "weight_only":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        cfg = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, bits=8, op_types_to_quantize=("MatMul",)
        )
        quantizer = MatMulNBitsQuantizer(
            model, bits=8, block_size=block_size, is_symmetric=symmetric, algo_config=cfg
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    elif method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            model_input=model,
            model_output=str(out_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"] if quantize_embedding else ["MatMul"],
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=False,
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return out_path


# --------------------------------------------------------------------------- #
# The artifacts a device needs
# --------------------------------------------------------------------------- #
def export_onnx(
    base: BaseManifest,
    spec: LoraSpec,
    out_dir: str | os.PathLike[str] | None = None,
    graphs: Sequence[str] = ("fp32", "int8", "decoder"),
    force: bool = False,
) -> Path:
    """Write the graphs a device needs, the tokenizer and ``onnx-manifest.json`` (the adapter's
    flat layout: names, shapes, offsets) for ``base`` + ``spec``. Graphs: ``fp32`` and ``int8``
    (weight-only) loss graphs, ``decoder`` (KV-cache generation step). Only missing ones are built.
    """
    import json
    import logging
    import shutil
    import time

    log = logging.getLogger(__name__)
    root = Path(out_dir) if out_dir else default_dir(base, spec)
    manifest_path = root / "onnx-manifest.json"
    done: dict[str, str] = {}
    if manifest_path.exists() and not force:
        try:
            previous = json.loads(manifest_path.read_text())
            if previous["base"]["sha256"] == base.sha256 and previous["adapter"] == spec.to_dict():
                done = dict(previous["graphs"])
        except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError: ValueError
            # a malformed manifest is treated as stale: every graph is exported again and the
            # manifest is rewritten below
            log.warning(
                "ignoring malformed %s (%r): exporting every graph again", manifest_path, err
            )
            done = {}
    missing = [g for g in graphs if g not in done]
    if not missing:
        return root
    if not base.hf_dir:
        raise ValueError(f"base {base.name} has no Hugging Face copy to export from")
    root.mkdir(parents=True, exist_ok=True)
    layout = spec.layout(base)
    start = time.monotonic()
    if "fp32" in missing or ("int8" in missing and "fp32" not in done):
        log.info(
            "exporting the %s loss graph with a %d-value adapter input (about 2 minutes)",
            base.name,
            adapter_size(layout),
        )
        export_loss_graph(base.hf_dir, root / "loss_fp32.onnx", layout, scale=spec.scale)
        done["fp32"] = "loss_fp32.onnx"
    if "int8" in missing:
        log.info("quantizing the base weights to int8 (weight-only; the adapter path stays fp32)")
        quantize_int8(root / "loss_fp32.onnx", root / "loss_int8.onnx")
        done["int8"] = "loss_int8.onnx"
    if "decoder" in missing:
        log.info("exporting the KV-cache decoder graph for generation (about 2 minutes)")
        export_decoder_graph(base.hf_dir, root / "decoder_fp32.onnx", layout, scale=spec.scale)
        done["decoder"] = "decoder_fp32.onnx"
    shutil.copy(Path(base.hf_dir) / "tokenizer.json", root / "tokenizer.json")
    entries, offset = [], 0
    for name, shape in layout:
        entries.append({"name": name, "shape": list(shape), "offset": offset})
        offset += math.prod(shape)
    manifest = {
        "schema": 1,
        "base": json.loads(base.to_json()),
        "adapter": spec.to_dict(),
        "size": offset,
        "layout": entries,
        "graphs": done,
        "tokenizer": "tokenizer.json",
        "eos_token_id": _eos_id(base.hf_dir),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log.info("ONNX artifacts in %s (%.0f s)", root, time.monotonic() - start)
    return root


def _eos_id(hf_dir: str) -> int | None:
    import json

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    eos = config.get("eos_token_id")
    return int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None
