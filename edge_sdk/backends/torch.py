"""The reference engine: transformers + PEFT LoRA in float32 on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.backends import Capabilities
from fleetune.edge_sdk.errors import BackendError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]


class LoraWeights:
    """The LoRA weights of a torch engine as torch parameters under their PEFT names
    (``_params``), coming and going as numpy: shared by both torch engines."""

    base: BaseManifest
    spec: LoraSpec
    _params: dict[str, torch.nn.Parameter]

    def set_adapter(self, tensors: Tensors) -> None:
        check_layout(tensors, self.spec, self.base)
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(torch.from_numpy(np.ascontiguousarray(tensors[name])))

    def get_adapter(self) -> Tensors:
        return {name: p.detach().numpy().copy() for name, p in self._params.items()}

    def trainable(self, part: str = "all") -> list[torch.nn.Parameter]:
        """The LoRA weights an optimizer moves: ``all`` or ``lora_b`` (A stays where it is)."""
        keep = {"all": ".lora_", "lora_b": ".lora_B."}
        if part not in keep:
            raise BackendError(f"trainable part {part!r} is not one of {sorted(keep)}")
        for name, param in self._params.items():
            param.requires_grad_(keep[part] in name)
        return [p for n, p in self._params.items() if keep[part] in n]


class TorchBackend(LoraWeights):
    """A base model wrapped with a PEFT LoRA adapter whose weights come and go as numpy."""

    capabilities = Capabilities(backprop=True, window=True)

    def __init__(self, base: BaseManifest, spec: LoraSpec, threads: int = 1) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not base.hf_dir:
            raise BackendError(f"base {base.name} has no Hugging Face copy: `fleetune export hf`")
        torch.set_num_threads(threads)
        self.base, self.spec = base, spec
        self._tokenizer_cls = AutoTokenizer
        self._tokenizer: Any = None  # loaded on first use
        try:
            model = AutoModelForCausalLM.from_pretrained(base.hf_dir, dtype=torch.float32)
        except OSError as err:
            raise BackendError(f"cannot load base {base.name} from {base.hf_dir}: {err}") from err
        config = LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT scales by alpha / r
            target_modules=list(spec.targets),
            layers_to_transform=list(spec.layers(base)) if spec.window else None,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, config)
        self.model.eval()
        self.layout = FlatLayout(spec, base)
        self._params = {
            self._peft_key(n): p for n, p in self.model.named_parameters() if p.requires_grad
        }

    @staticmethod
    def _peft_key(name: str) -> str:
        return name.replace(".default.weight", ".weight")

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            try:
                self._tokenizer = self._tokenizer_cls.from_pretrained(self.base.hf_dir)
            except (OSError, ValueError) as err:
                raise BackendError(
                    f"no tokenizer for {self.base.name} in {self.base.hf_dir}: {err}"
                ) from err
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def loss_tensor(self, input_ids: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        return self.model(input_ids=ids, labels=ids).loss

    @torch.no_grad()
    def loss(self, input_ids: np.ndarray) -> float:
        return float(self.loss_tensor(input_ids))

    @torch.no_grad()
    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """Loss with the adapter vector ``flat`` (copied into the LoRA weights first)."""
        for name, value in self.layout.unflatten(flat).items():
            self._params[name].copy_(torch.from_numpy(value))
        return self.loss(input_ids)

    # -- a layer window over cached prefix states (tuners/window.py) ----------------------------
    @property
    def _causal(self) -> Any:
        """The causal LM inside PEFT's wrapper (``.model``: the decoder, ``.lm_head``)."""
        return getattr(self.model, "base_model").model  # noqa: B009  # untyped for mypy

    @torch.no_grad()
    def prefix(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        """The hidden states entering decoder layer ``start`` (float32 [batch, tokens, hidden]):
        what a window tuner caches, since the layers below it never change."""
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        hidden = self._causal.model.embed_tokens(ids)
        return run_layers(self._causal.model, hidden, range(start)).numpy()

    def window_loss_tensor(self, hidden: np.ndarray, input_ids: np.ndarray) -> torch.Tensor:
        """The loss from cached states entering the adapter's window: its layers, the final
        norm and the head (the full model's loss for the same tokens and adapter)."""
        causal = self._causal
        layers = self.spec.layers(self.base)
        out = run_layers(causal.model, torch.from_numpy(np.ascontiguousarray(hidden)), layers)
        logits = causal.lm_head(causal.model.norm(out))
        labels = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        return causal.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])

    @torch.no_grad()
    def window_loss_flat(
        self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray
    ) -> float:
        """:meth:`window_loss_tensor` with the adapter vector ``flat`` (a ZO step's forward)."""
        for name, value in self.layout.unflatten(flat).items():
            self._params[name].copy_(torch.from_numpy(value))
        return float(self.window_loss_tensor(hidden, input_ids))

    def close(self) -> None:
        del self.model, self._params


def run_layers(inner: Any, hidden: torch.Tensor, layers: range) -> torch.Tensor:
    """``hidden`` through the decoder ``inner``'s ``layers`` as the model runs them (causal
    attention over every position, rotary positions from 0): a layer window's forward, here and
    in the exported window graph (``models/onnx/graphs.py``)."""
    from transformers.masking_utils import create_causal_mask

    steps = torch.arange(hidden.shape[1])
    positions = steps.unsqueeze(0)
    mask = create_causal_mask(
        config=inner.config,
        input_embeds=hidden,
        attention_mask=None,
        cache_position=steps,
        past_key_values=None,
        position_ids=positions,
    )
    rotary = inner.rotary_emb(hidden, positions)
    for i in layers:
        hidden = inner.layers[i](
            hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary
        )
    return hidden
