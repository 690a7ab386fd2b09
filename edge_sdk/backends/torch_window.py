"""A lean torch engine for layer windows: it holds only the adapter's window of decoder layers,
the final norm and the head, in plain torch (no transformers, no PEFT). Long because it carries
what those libraries would: the Llama layer, a checkpoint reader, a fused head loss and
activation checkpointing.

The layers below the window never change while a window adapter tunes, so nothing needs them
in memory between cache builds: :meth:`TorchWindowBackend.prefix_into` streams them from the
base's safetensors checkpoint one layer at a time, runs every cached row through that layer and
lets it go. What stays resident is the window (SmolLM2, 4 layers: 14M parameters), the
embedding table the head shares (28M) and the cache. ``precision = "bf16"`` keeps the frozen
weights in bfloat16 and runs their matmuls there (the LoRA weights, norms, attention scores and
the loss stay float32): about 3x faster matmuls on CPUs with native bf16 (AVX512-BF16, AMX)
and half the memory; for backprop in the window, not for zeroth-order steps, whose loss
differences bf16's rounding would drown. ``precision = "int8"`` stores the decoder layers'
frozen weights as int8 with one scale per output row (the prefix's as they stream, and the
window's) and runs their matmuls in bfloat16, the scale applied to the product; the embedding
table the head shares is int8 too (a scale per token), and the head's loss goes through the
vocabulary a slab of rows at a time, so no dequantized copy of it exists whole.
``precision = "int4"`` stores the decoder layers' weights in 4 bits, a float16 scale and minimum
per group of 32 weights of a row (GGUF's Q4_1, the format SmolLM2's layers ship in, so their
values come back exactly), dequantized to bfloat16 for each matmul; the table stays int8 (it
ships as Q8_0). The layers take 62.5% of int8's memory (SmolLM2: 67 MB against 106) for a
step ~6% slower than int8's (``benchmarks/lean_int8.py``).

The layer is the Llama decoder layer as transformers runs it (RMSNorm, rotary positions,
grouped-query causal attention, SwiGLU), with PEFT's LoRA on the target projections
(``y = W x + alpha / r * B A x``); its loss matches the transformers + PEFT engine
(``tests/unit/test_torch_window.py``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.backends import Capabilities, StatesMemo, pairs_in_use, same_tensors
from fleetune.edge_sdk.backends.torch import LoraWeights
from fleetune.edge_sdk.errors import BackendError, ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
STORED = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # safetensors dtypes read
# the dtype each precision's matmuls run in
PRECISIONS = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.bfloat16,
    "int4": torch.bfloat16,
}
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ROWS = 8  # rows per chunk while a prefix layer streams over the cache
SLAB = 16 * 2**20  # bytes read per slab while a tensor loads
INT8_SLAB = 2**20  # ... and while one is quantized as it loads (float temporaries this size)
# tokens per slab of logits in the head's loss: 128 (matmuls ~20% faster than at 64), 64 under
# a memory budget (recompute: half the slab, ~25 MB less at SmolLM2's vocabulary)
HEAD_ROWS = {False: 128, True: 64}
VOCAB_SLAB = 4096  # vocabulary rows per slab of an int8 head's loss ([tokens, 4096] logits)
GROUP = 32  # int4: consecutive weights of a row sharing a scale and a minimum (GGUF's Q4_1 block)


def lora_name(layer: int, target: str, ab: str) -> str:
    """PEFT's name of a LoRA tensor (``LoraSpec.layout``'s keys)."""
    return f"base_model.model.model.layers.{layer}.{PROJECTIONS[target]}.{target}.lora_{ab}.weight"


def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Checkpoint:
    """The base's safetensors checkpoint, read tensor by tensor with plain file reads (a
    memory map would leave every page it touched in the process's resident set)."""

    def __init__(self, hf_dir: str) -> None:
        root = Path(hf_dir)
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise BackendError(f"no safetensors checkpoint in {root}: `fleetune export hf`")
        self.config = json.loads((root / "config.json").read_text())
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._where.update({name: (path, 8 + size, meta) for name, meta in header.items()})

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        shape = self._meta(name)["shape"]
        out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1)
        for i, raw in self._slabs(name, SLAB):
            flat[i : i + len(raw)] = raw
        return out

    def get_int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-D tensor ``name`` quantized as it is read (``quantize_int8``)."""
        rows, cols = self._meta(name)["shape"]
        q, scale = torch.empty((rows, cols), dtype=torch.int8), torch.empty(rows)
        self._quantize_rows(name, quantize_int8, q, scale)
        return q, scale

    def get_int4(self, name: str) -> Int4Weight:
        """The 2-D tensor ``name`` in int4 groups (``quantize_int4``), quantized as it is read."""
        rows, cols = self._meta(name)["shape"]
        if cols % GROUP or rows % 2:
            raise BackendError(
                f"{name} is {rows} x {cols}: int4 needs an even number of rows and columns in "
                f'groups of {GROUP}; use precision = "int8"'
            )
        codes = torch.empty((rows, cols), dtype=torch.uint8)
        scale, low = torch.empty((2, rows, cols // GROUP), dtype=torch.float16)
        self._quantize_rows(name, quantize_int4, codes, scale, low)
        return Int4Weight(codes[: rows // 2] | (codes[rows // 2 :] << 4), scale, low)

    def _quantize_rows(
        self, name: str, quantize: Callable[..., tuple[torch.Tensor, ...]], *outs: torch.Tensor
    ) -> None:
        """Fill ``outs`` (one row each per row of ``name``) with ``quantize`` of the 2-D tensor
        ``name``, a slab of rows at a time: no float copy of the whole tensor exists, and the
        temporaries are small."""
        cols = self._meta(name)["shape"][1]
        for i, raw in self._slabs(name, INT8_SLAB):
            part, first = raw.view(-1, cols), i // cols
            for out, values in zip(outs, quantize(part.float()), strict=True):
                out[first : first + len(part)] = values

    def _meta(self, name: str) -> dict:
        if name not in self._where:
            raise BackendError(f"the checkpoint has no tensor {name}")
        meta = self._where[name][2]
        if meta["dtype"] not in STORED:
            raise BackendError(f"{name} is {meta['dtype']}, not one of {sorted(STORED)}")
        return meta

    def _slabs(self, name: str, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``name``'s values in slabs of whole rows of about ``size`` bytes: (first value's
        index, the values in the checkpoint's dtype), read with plain file reads."""
        path, body, meta = self._where[name]
        begin, _ = meta["data_offsets"]
        kind, shape = np.dtype(STORED[meta["dtype"]]), meta["shape"]
        total, row = math.prod(shape), math.prod(shape[1:])
        step = max(1, size // (row * kind.itemsize)) * row
        with path.open("rb") as f:
            f.seek(body + begin)
            for i in range(0, total, step):
                count = min(step, total - i)
                raw = torch.from_numpy(np.fromfile(f, dtype=kind, count=count))
                if len(raw) != count:
                    raise BackendError(f"{path} ends inside tensor {name}: truncated")
                yield i, raw.view(torch.bfloat16) if meta["dtype"] == "BF16" else raw


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per output row: ``weight ~ q * scale[:, None]``."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of :data:`GROUP` weights of a row (GGUF's Q4_1):
    ``weight ~ codes * scale + low`` with codes in 0..15 (one per byte here) and a float16
    scale and minimum per group."""
    rows, cols = weight.shape
    groups = weight.view(rows, cols // GROUP, GROUP)
    low = groups.amin(dim=-1)
    scale = ((groups.amax(dim=-1) - low) / 15).half()
    low = low.half()
    step = scale.float().clamp_min(1e-12)[..., None]
    codes = torch.round((groups - low.float()[..., None]) / step).clamp_(0, 15)
    return codes.to(torch.uint8).view(rows, cols), scale, low


class Int4Weight:
    """A weight matrix in int4 groups (:func:`quantize_int4`), two codes per byte: row ``i``'s
    in the low nibbles of ``packed[i]``, row ``i + rows / 2``'s in the high ones (unpacking
    then writes two contiguous halves, ~5x faster than a group's halves side by side)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.packed, self.scale, self.low = packed, scale, low
        self.shape = (2 * packed.shape[0], packed.shape[1])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        half, cols = self.packed.shape
        w = torch.empty(2 * half, cols)
        w[:half], w[half:] = self.packed & 15, self.packed >> 4
        # float32 arithmetic, then one cast: broadcasting in bfloat16 is ~3x slower on CPU
        groups = w.view(2 * half, -1, GROUP)
        groups.mul_(self.scale.float()[..., None]).add_(self.low.float()[..., None])
        return w.to(dtype)


class Int4Linear(torch.autograd.Function):
    """``x @ weight.T`` for an :class:`Int4Weight`, dequantized to ``x``'s dtype for the
    matmul; when ``x`` needs a gradient the dequantized weight is kept for the backward pass
    (one layer's at a time under :class:`Recompute`: SmolLM2, 7 MB) instead of dequantizing
    it again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Int4Weight) -> Any:
        w = weight.dequantize(x.dtype)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(w)
        return F.linear(x, w).float()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (w,) = ctx.saved_tensors
        return upstream.to(w.dtype) @ w, None


class Int8Table:
    """An int8 embedding table (``quantize_int8``: a scale per token's row) that the head may
    share: rows are looked up and scaled; the head's loss is :class:`Int8HeadLoss`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.q, self.scale = q, scale
        self.dtype, self.shape = q.dtype, q.shape

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.q).float() * self.scale[ids][..., None]


class Int8Linear(torch.autograd.Function):
    """``x @ (q * scale[:, None]).T`` for int8 weights: the matmul runs on ``q`` cast to
    ``x``'s dtype and the scale multiplies the product's columns, so no dequantized weight
    outlives the call, nor is one kept for the backward pass (only ``q`` and ``scale``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> Any:
        ctx.save_for_backward(q, scale)
        ctx.dtype = x.dtype
        return F.linear(x, q.to(x.dtype)).float() * scale

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        q, scale = ctx.saved_tensors
        return (upstream * scale).to(ctx.dtype) @ q.to(ctx.dtype), None, None


class Layer(torch.nn.Module):
    """One Llama decoder layer: frozen weights in ``dtype`` (or ``quant``: "int8", "int4",
    their matmuls in ``dtype``), LoRA A and B on ``targets``."""

    def __init__(
        self,
        ckpt: Checkpoint,
        index: int,
        dtype: torch.dtype,
        targets: tuple[str, ...],
        r: int,
        quant: str = "",
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.dtype = dtype
        self.weights: dict[str, torch.Tensor | Int4Weight] = {}
        self.scales: dict[str, torch.Tensor] = {}
        for name, part in PROJECTIONS.items():
            stored = f"{prefix}.{part}.{name}.weight"
            if quant == "int8":
                self.weights[name], self.scales[name] = ckpt.get_int8(stored)
            elif quant == "int4":
                self.weights[name] = ckpt.get_int4(stored)
            else:
                self.weights[name] = ckpt.get(stored, dtype)
        self.norms = {
            name: ckpt.get(f"{prefix}.{name}.weight", torch.float32)
            for name in ("input_layernorm", "post_attention_layernorm")
        }
        self.lora = torch.nn.ParameterDict()
        for name in targets:
            out_dim, in_dim = self.weights[name].shape
            self.lora[f"{name}_A"] = torch.nn.Parameter(torch.zeros(r, in_dim))
            self.lora[f"{name}_B"] = torch.nn.Parameter(torch.zeros(out_dim, r))

    def project(self, name: str, x: torch.Tensor, scale: float) -> torch.Tensor:
        weight = self.weights[name]
        if isinstance(weight, Int4Weight):
            y = Int4Linear.apply(x.to(self.dtype), weight)
        elif name in self.scales:
            y = Int8Linear.apply(x.to(self.dtype), weight, self.scales[name])
        else:
            y = F.linear(x.to(weight.dtype), weight).float()
        if f"{name}_A" in self.lora:
            y = y + scale * F.linear(F.linear(x, self.lora[f"{name}_A"]), self.lora[f"{name}_B"])
        return y


class Llama:
    """What every layer shares: shapes, the norm's epsilon and the rotary tables."""

    def __init__(self, config: dict, lora_scale: float) -> None:
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads", self.heads)
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.theta = float(config.get("rope_theta", 10000.0))
        self.scale = lora_scale
        unsupported = {
            "model_type": config.get("model_type", "llama") != "llama",
            "rope_scaling": bool(config.get("rope_scaling")),
            "attention_bias": bool(config.get("attention_bias")),
            "mlp_bias": bool(config.get("mlp_bias")),
            "hidden_act": config.get("hidden_act", "silu") != "silu",
        }
        if bad := [key for key, on in unsupported.items() if on]:
            raise BackendError(
                f"the lean window engine runs plain llama layers; this checkpoint sets "
                f"{', '.join(f'{k} = {config[k]!r}' for k in bad)}: use the transformers engine"
            )

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rotary(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        freqs = torch.outer(torch.arange(tokens).float(), inv)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()

    def layer(self, layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch, tokens, _ = x.shape
        h = self.norm(x, layer.norms["input_layernorm"])

        def heads(name: str, count: int) -> torch.Tensor:
            y = layer.project(name, h, self.scale)
            return y.view(batch, tokens, count, self.head_dim).transpose(1, 2)

        q, k, v = (
            heads("q_proj", self.heads),
            heads("k_proj", self.kv_heads),
            heads("v_proj", self.kv_heads),
        )
        cos, sin = rope
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + layer.project("o_proj", attn.transpose(1, 2).reshape(batch, tokens, -1), self.scale)
        h = self.norm(x, layer.norms["post_attention_layernorm"])
        gated = F.silu(layer.project("gate_proj", h, self.scale)) * layer.project(
            "up_proj", h, self.scale
        )
        return x + layer.project("down_proj", gated, self.scale)


class FusedLoss(torch.autograd.Function):
    """A loss whose forward pass saves the gradient for its input (``None`` when none is
    needed): the backward pass only scales it."""

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * upstream if grad is not None else None), None, None, None


class HeadLoss(FusedLoss):
    """Mean next-token cross-entropy of ``x @ head.T`` computed ``rows`` tokens at a
    time, with the gradient for ``x`` worked out in the same pass when one is needed: the
    [tokens, vocabulary] logits (SmolLM2: 49,152 per token) never exist whole, neither for the
    forward nor for the backward (the fused linear cross-entropy of Liger-Kernel)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, rows: int
    ) -> torch.Tensor:
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(x), rows):
            picked = labels[i : i + rows]
            logits = F.linear(x[i : i + rows].to(head.dtype), head).float()
            top = logits.max(dim=-1, keepdim=True).values
            target = logits.gather(1, picked[:, None]) - top
            # in place, one [rows, vocabulary] buffer; exp below -80 (< 2e-35 each) is clamped:
            # torch's exp is ~20x slower where it underflows, and the sum does not see it
            probs = logits.sub_(top).clamp_(min=-80.0).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total += (sums.log() - target).sum()
            if grad is not None:  # softmax - one-hot
                probs.div_(sums)[torch.arange(len(picked)), picked] -= 1.0
                grad[i : i + rows] = (probs.to(head.dtype) @ head).float()
        ctx.save_for_backward(grad.div_(len(x)) if grad is not None else None)
        return (total / len(x)).float()


class Int8HeadLoss(FusedLoss):
    """:class:`HeadLoss` for an int8 head: every token at once against a slab of
    :data:`VOCAB_SLAB` vocabulary rows at a time, each slab cast to ``dtype`` for its matmul
    (``logits = x @ q.T * scale``), so neither the dequantized head nor the whole logits ever
    exist. The first pass takes each token's log-sum-exp online over the slabs; the gradient
    needs the softmax, so a second pass computes each slab's logits again (one more head
    matmul per step than :class:`HeadLoss`, for ~40 MB less at SmolLM2's vocabulary)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, table: Int8Table, labels: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        xs, tokens = x.to(dtype), len(x)
        top = torch.full((tokens,), -math.inf)
        sums, target = torch.zeros(tokens), torch.zeros(tokens)
        for first, logits in _head_slabs(xs, table):
            hit = (labels >= first) & (labels < first + logits.shape[1])
            target[hit] = logits[hit, labels[hit] - first]
            new_top = torch.maximum(top, logits.max(dim=1).values)
            # exp below -80 clamped, as in HeadLoss (torch's exp is slow where it underflows)
            probs = logits.sub_(new_top[:, None]).clamp_(min=-80.0).exp_()
            sums = sums * torch.exp(top - new_top) + probs.sum(dim=1)
            top = new_top
        lse = top + sums.log()
        grad = None
        if ctx.needs_input_grad[0]:  # softmax - one-hot, slab by slab
            grad = torch.zeros_like(x)
            for first, logits in _head_slabs(xs, table):
                probs = logits.sub_(lse[:, None]).clamp_(min=-80.0).exp_()
                hit = (labels >= first) & (labels < first + probs.shape[1])
                probs[hit, labels[hit] - first] -= 1.0
                rows = slice(first, first + probs.shape[1])
                grad += (probs.mul_(table.scale[rows]).to(dtype) @ table.q[rows].to(dtype)).float()
            grad.div_(tokens)
        ctx.save_for_backward(grad)
        return (lse - target).mean()


def _head_slabs(x: torch.Tensor, table: Int8Table) -> Iterator[tuple[int, torch.Tensor]]:
    """(first vocabulary row, float32 logits of every token of ``x`` for the slab's rows)."""
    for first in range(0, table.shape[0], VOCAB_SLAB):
        rows = slice(first, first + VOCAB_SLAB)
        yield first, F.linear(x, table.q[rows].to(x.dtype)).float() * table.scale[rows]


class Recompute(torch.autograd.Function):
    """Activation checkpointing of one layer (``run``): the forward keeps only its input, the
    backward runs it again with gradients and back-propagates through that. Written here
    because ``torch.utils.checkpoint`` imports ``torch._dynamo`` (about 70 MB resident)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor
    ) -> Any:
        """``keep``: where the input is kept (a buffer reused step after step)."""
        ctx.run = run
        ctx.save_for_backward(keep.copy_(x))
        return run(x)  # autograd is off inside forward: nothing of the layer is kept

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = ctx.run(x)
        torch.autograd.backward(y, upstream)  # the LoRA weights' gradients accumulate here
        return x.grad, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class TorchWindowBackend(LoraWeights):
    """A window adapter's engine: the window's layers, the final norm and the head in memory;
    the layers below streamed from the checkpoint when states are needed."""

    capabilities = Capabilities(
        backprop=True, window=True, streamed_prefix=True, prefix_adapter=True
    )

    def __init__(
        self,
        base: BaseManifest,
        spec: LoraSpec,
        threads: int = 1,
        precision: str = "fp32",
        recompute: bool = False,
    ) -> None:
        """``recompute`` (devices under a memory budget): keep only each window layer's input
        for backprop and run the layer again in the backward pass (activation checkpointing:
        SmolLM2, ~15 MB less per layer at 4 x 64 tokens, for one more forward of the window per
        step), and score the head 64 tokens at a time instead of 128."""
        if not spec.window:
            raise ConfigError("the lean window engine needs lora_window = K > 0")
        if precision not in PRECISIONS:
            raise ConfigError(
                f"torch window precision {precision!r} is not one of {sorted(PRECISIONS)}"
            )
        if not base.hf_dir:
            raise BackendError(f"base {base.name} has no Hugging Face copy: `fleetune export hf`")
        torch.set_num_threads(threads)
        self.base, self.spec, self.precision, self.recompute = base, spec, precision, recompute
        self.dtype = PRECISIONS[precision]
        self.quant = precision if precision in ("int8", "int4") else ""
        if precision != "fp32" and not bf16_native():
            log.warning("bf16 on a CPU without native bf16 matmuls: expect it slower than fp32")
        self.ckpt = Checkpoint(base.hf_dir)
        self.llama = Llama(self.ckpt.config, spec.alpha / spec.r)
        self.window = spec.layers(base)
        self.embed = self._table("model.embed_tokens.weight")
        tied = self.ckpt.config.get("tie_word_embeddings", not self.ckpt.has("lm_head.weight"))
        self.head = self.embed if tied else self._table("lm_head.weight")
        self.final_norm = self.ckpt.get("model.norm.weight", torch.float32)
        self.layers = {
            i: Layer(self.ckpt, i, self.dtype, tuple(spec.targets), spec.r, self.quant)
            for i in self.window
        }
        self.model = torch.nn.ModuleDict({str(i): layer for i, layer in self.layers.items()})
        self.model.requires_grad_(False)
        self.layout = FlatLayout(spec, base)
        self._params: dict[str, torch.nn.Parameter] = {
            lora_name(i, t, ab): getattr(layer.lora, f"{t}_{ab}")
            for i, layer in self.layers.items()
            for t in spec.targets
            for ab in ("A", "B")
        }
        self.set_adapter(init_lora(spec, base))  # the fleet's shared A, B zero
        self._below: Tensors = {}  # the fleet's LoRA tensors of layers below the window
        self.prefix_version = 0  # changes with them (a cache of prefix states is then stale)
        self._states = StatesMemo()
        self._tokenizer: Any = None
        self._inputs: list[torch.Tensor] = []

    def _table(self, name: str) -> torch.Tensor | Int8Table:
        """An embedding table or head: int8 with ``precision = "int8"`` or ``"int4"`` (SmolLM2's
        ships as Q8_0: 4 bits would lose what it has), else in ``dtype``."""
        if self.quant:
            return Int8Table(*self.ckpt.get_int8(name))
        return self.ckpt.get(name, self.dtype)

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = Path(self.base.hf_dir or "") / "tokenizer.json"
            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as err:
                raise BackendError(f"no tokenizer for {self.base.name} at {path}: {err}") from err
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    # -- the prefix, streamed ---------------------------------------------------------------
    @torch.no_grad()
    def prefix_into(
        self,
        input_ids: np.ndarray,
        start: int,
        out: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Write the states entering layer ``start`` for every row of ``input_ids`` into
        ``out`` ([rows, tokens, hidden] float32, in RAM or a memory map): layer after layer,
        each read from the checkpoint, run over all rows in chunks and dropped."""
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        states = torch.from_numpy(out)
        for i in range(0, len(ids), ROWS):
            rows = ids[i : i + ROWS]
            states[i : i + ROWS] = (
                self.embed.lookup(rows)
                if isinstance(self.embed, Int8Table)
                else F.embedding(rows, self.embed).float()
            )
        rope = self.llama.rotary(ids.shape[1])
        for index in range(start):
            layer = self._prefix_layer(index)
            for i in range(0, len(ids), ROWS):
                states[i : i + ROWS] = self.llama.layer(layer, states[i : i + ROWS], rope)
            del layer
            if progress is not None:
                progress(index + 1, start)

    def _prefix_layer(self, index: int) -> Layer:
        """Layer ``index`` below the window, under the fleet's adapter where it has one."""
        targets = tuple(t for t in self.spec.targets if lora_name(index, t, "B") in self._below)
        layer = Layer(self.ckpt, index, self.dtype, targets, self.spec.r, self.quant)
        for t in targets:
            for ab in ("A", "B"):
                layer.lora[f"{t}_{ab}"].data = torch.from_numpy(
                    self._below[lora_name(index, t, ab)]
                )
        return layer

    def set_prefix_adapter(self, tensors: Tensors) -> None:
        """The fleet's LoRA tensors of layers below the window (``PrefixAdapted``); a pair
        whose B is zero changes nothing and is left out. New ones drop the memo of states."""
        below = pairs_in_use(tensors)
        if not same_tensors(below, self._below):
            self._below, self.prefix_version = below, self.prefix_version + 1
            self._states.clear()

    def prefix(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        ids = np.asarray(input_ids)
        out = np.empty((*ids.shape, self.base.hidden_size), dtype=np.float32)
        self.prefix_into(ids, start, out)
        return out

    # -- the window ---------------------------------------------------------------------------
    def window_loss_tensor(self, hidden: np.ndarray, input_ids: np.ndarray) -> torch.Tensor:
        """The loss from cached states entering the window: its layers, the final norm and the
        head (the full model's loss for the same tokens and adapter)."""
        x = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        rope = self.llama.rotary(x.shape[1])
        recompute = self.recompute and torch.is_grad_enabled()
        if recompute:
            x.requires_grad_(True)  # so that the first layer's Recompute is differentiated
            kept = self._kept(x)
        for n, i in enumerate(self.window):
            layer = self.layers[i]
            if recompute:
                run = lambda h, layer=layer: self.llama.layer(layer, h, rope)  # noqa: E731
                x = Recompute.apply(x, run, kept[n])
            else:
                x = self.llama.layer(layer, x, rope)
        x = self.llama.norm(x[:, :-1], self.final_norm).reshape(-1, x.shape[-1])
        labels = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[:, 1:].reshape(-1)
        if isinstance(self.head, Int8Table):
            return Int8HeadLoss.apply(x, self.head, labels, self.dtype)
        return HeadLoss.apply(x, self.head, labels, HEAD_ROWS[self.recompute])

    def _kept(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A buffer per window layer for the input it keeps for its recompute, allocated once
        for a batch shape: fresh ones, alive from the forward pass to the backward, would land
        between the layers' temporaries and split the allocator's free space (alone ~12 MB
        of peak RSS for a window of 30 int4 layers, ~40 MB with the optimizer's gradients
        allocated once, ``tuners/backprop.AdamW``). A second forward pass before the first
        one's backward overwrites them; that backward then fails with torch's "modified by an
        inplace operation" error instead of using wrong inputs."""
        if not self._inputs or self._inputs[0].shape != x.shape:
            self._inputs = []  # the old ones freed first
            self._inputs = [torch.empty_like(x) for _ in self.window]
        return self._inputs

    @torch.no_grad()
    def window_loss_flat(
        self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray
    ) -> float:
        self.set_adapter(self.layout.unflatten(flat))
        return float(self.window_loss_tensor(hidden, input_ids))

    def loss_tensor(self, input_ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(input_ids)
        hidden = self._states.get(ids, lambda rows: self.prefix(rows, self.window.start))
        return self.window_loss_tensor(hidden, ids)

    @torch.no_grad()
    def loss(self, input_ids: np.ndarray) -> float:
        return float(self.loss_tensor(input_ids))

    @torch.no_grad()
    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        self.set_adapter(self.layout.unflatten(flat))
        return self.loss(input_ids)

    def close(self) -> None:
        self._states.clear()
        del self.model, self._params, self.embed, self.head
