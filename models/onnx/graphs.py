"""The two graphs a device runs, and the one export call both go through.

- loss graph: ``(input_ids, attention_mask, labels, adapter) -> loss`` (what tuning evaluates)
- decoder graph: ``(input_ids, attention_mask, position_ids, past.*, adapter) -> (logits,
  present.*)``, one graph for prefill (``P = 0``) and decoding (``T = 1``)
- for an adapter on a layer window (``LoraSpec.window``): the prefix graph ``input_ids ->
  hidden`` (the frozen layers below the window, run once per dataset) and the window graph
  ``(hidden, labels, adapter) -> loss`` (the window's layers, the final norm and the head). Both
  attend causally over every position: the windows a tuner caches are full, never padded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.backends.torch import run_layers
from fleetune.models.onnx.hooks import LoraHooks

IGNORE_INDEX = -100


def load_base(hf_dir: str | os.PathLike[str]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, shifted like HF ``ForCausalLMLoss``."""
    v = logits.shape[-1]
    shift_logits = logits[:, :-1, :].float().reshape(-1, v)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="mean")


class LossGraph(nn.Module):
    def __init__(self, lora: LoraHooks) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, input_ids, attention_mask, labels, adapter) -> torch.Tensor:
        out = self.lora.run(
            adapter, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return causal_lm_loss(out.logits, labels)


class PrefixGraph(nn.Module):
    """The hidden states entering decoder layer ``start``."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.model, self.start = model, start

    def forward(self, input_ids):
        inner = self.model.model
        return run_layers(inner, inner.embed_tokens(input_ids), range(self.start))


class WindowGraph(nn.Module):
    """The loss from the states entering the adapter's window (``lora.layout``'s layers)."""

    def __init__(self, lora: LoraHooks) -> None:
        super().__init__()
        self.lora = lora
        self.layers = lora.layout.spec.layers(lora.layout.base)

    def forward(self, hidden, labels, adapter) -> torch.Tensor:
        model: Any = self.lora.model
        with self.lora.active(adapter):
            out = run_layers(model.model, hidden, self.layers)
        return causal_lm_loss(model.lm_head(model.model.norm(out)), labels)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(input_names, output_names)`` of the decoder graph, in graph order."""
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past, "adapter"], ["logits", *present]


class DecoderGraph(nn.Module):
    """``past`` is ``(key_0, value_0, key_1, ...)``; it fills a ``DynamicCache`` the model extends
    by the ``T`` new positions, returned flattened in the same order. ``logits`` holds the last
    position only (``[B, 1, V]``)."""

    def __init__(self, lora: LoraHooks, num_layers: int) -> None:
        super().__init__()
        self.lora, self.num_layers = lora, num_layers

    def forward(self, input_ids, attention_mask, position_ids, past, adapter):
        from transformers.cache_utils import DynamicCache

        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lora.run(
            adapter,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export(
    module: nn.Module,
    example: tuple,
    names: tuple[list[str], list[str]],
    dynamic_shapes: Any,
    out_path: str | os.PathLike[str],
    opset: int = 18,
) -> Path:
    """Dynamo-export ``module``; base weights go to ``<out_path>.data`` (external data)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            external_data=True,
        )
    if program is None:  # only None when `f` is given; kept for type-checkers
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.save(str(out_path), external_data=True)
    return out_path


def export_loss_graph(hf_dir: str, out_path: str | os.PathLike[str], layout: FlatLayout) -> Path:
    """The loss graph: ``input_ids``/``attention_mask``/``labels`` int64 ``[B, T]`` (dynamic),
    ``adapter`` float32 ``[N]`` → scalar float32 ``loss``."""
    model = load_base(hf_dir)
    graph = LossGraph(LoraHooks(model, layout)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    adapter = torch.randn(layout.size, generator=g) * 0.02
    names = (["input_ids", "attention_mask", "labels", "adapter"], ["loss"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {n: ({0: batch, 1: seq} if n != "adapter" else None) for n in names[0]}
    return export(graph, (ids, torch.ones_like(ids), ids.clone(), adapter), names, dims, out_path)


def export_decoder_graph(hf_dir: str, out_path: str | os.PathLike[str], layout: FlatLayout) -> Path:
    """The KV-cache decoder step (see the module doc)."""
    model = load_base(hf_dir)
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    graph = DecoderGraph(LoraHooks(model, layout), n_layers).eval()
    g = torch.Generator().manual_seed(0)
    batch_size, new_len, past_len = 2, 3, 5  # > 1 so that no dim is specialized
    ids = torch.randint(0, int(cfg.vocab_size), (batch_size, new_len), generator=g)
    mask = torch.ones(batch_size, past_len + new_len, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + new_len).expand(batch_size, -1).contiguous()
    past = [
        torch.randn(batch_size, kv_heads, past_len, head_dim, generator=g)
        for _ in range(2 * n_layers)
    ]
    adapter = torch.randn(layout.size, generator=g) * 0.02
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    past_seq = torch.export.Dim("past", min=0)
    total = torch.export.Dim("total")  # P + T; torch.export only derives dims from one Dim
    kv_spec = {0: batch, 2: past_seq}
    dims = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple([kv_spec] * (2 * n_layers)),
        None,
    )
    example = (ids, mask, pos, tuple(past), adapter)
    return export(graph, example, decoder_io_names(n_layers), dims, out_path)


def export_window_graphs(
    hf_dir: str,
    prefix_path: str | os.PathLike[str],
    window_path: str | os.PathLike[str],
    layout: FlatLayout,
) -> tuple[Path, Path]:
    """The prefix graph (``input_ids`` int64 ``[B, T]`` -> ``hidden`` float32 ``[B, T, H]``) and
    the window graph (``hidden``, ``labels`` int64 ``[B, T]``, ``adapter`` float32 ``[N]`` ->
    ``loss``) of ``layout``'s window."""
    model = load_base(hf_dir)
    start = layout.spec.layers(layout.base).start
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    tokens = {0: batch, 1: seq}
    prefix_graph = PrefixGraph(model, start).eval()
    prefix = export(
        prefix_graph,
        (ids,),
        (["input_ids"], ["hidden"]),
        {"input_ids": tokens},
        prefix_path,
    )
    with torch.no_grad():
        hidden = prefix_graph(ids)
    adapter = torch.randn(layout.size, generator=g) * 0.02
    names = (["hidden", "labels", "adapter"], ["loss"])
    dims = {"hidden": tokens, "labels": tokens, "adapter": None}
    graph = WindowGraph(LoraHooks(model, layout)).eval()
    window = export(graph, (hidden, ids, adapter), names, dims, window_path)
    return prefix, window
