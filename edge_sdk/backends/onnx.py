"""ONNX Runtime engine: the base (int8 weights) with the LoRA adapter as one flat fp32 graph
input, the loss computed inside the graph. Imports neither torch nor transformers: tokenization
uses ``tokenizers``. The artifacts come from ``fleetune export onnx`` (``models/onnx_export.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.adapters.lora import LoraSpec
from edge_sdk.adapters.lora.flat import FlatLayout
from edge_sdk.adapters.lora.io import check_layout
from edge_sdk.errors import BackendError, BackendUnavailable, ConfigError, PayloadError
from edge_sdk.manifest import BaseManifest

try:
    import onnxruntime as ort
    from tokenizers import Tokenizer
except ImportError as err:  # pragma: no cover - depends on the extra
    raise BackendUnavailable("the onnx backend needs: pip install 'fleetune[onnx]'") from err

Tensors = dict[str, np.ndarray]
ONNX_MANIFEST = "onnx-manifest.json"
ONNX_MANIFEST_SCHEMA = 1  # the "schema" that models/onnx_export.py writes


@dataclass(frozen=True)
class OnnxArtifacts:
    """What ``fleetune export onnx`` wrote: graphs, tokenizer, and the adapter's flat layout."""

    root: Path
    base: BaseManifest
    spec: LoraSpec
    layout: list[tuple[str, tuple[int, ...], int]]  # (name, shape, offset) in the flat input
    size: int
    graphs: dict[str, str]  # "fp32" | "int8" (loss graphs), "decoder" (KV cache) -> file name
    tokenizer: str
    eos_token_id: int | None = None

    @classmethod
    def load(cls, root: str | Path) -> OnnxArtifacts:
        root = Path(root)
        path = root / ONNX_MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"no readable {ONNX_MANIFEST} in {root}: run `fleetune export onnx`"
            ) from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object")
        schema = data.get("schema", ONNX_MANIFEST_SCHEMA)
        if schema != ONNX_MANIFEST_SCHEMA:
            raise ConfigError(
                f"{path} has schema {schema!r}, this fleetune reads {ONNX_MANIFEST_SCHEMA}: "
                "re-run `fleetune export onnx --force`"
            )
        try:
            layout = [(e["name"], tuple(e["shape"]), int(e["offset"])) for e in data["layout"]]
            return cls(
                root,
                BaseManifest.from_dict(data["base"]),
                LoraSpec.from_dict(data["adapter"]),
                layout,
                int(data["size"]),
                dict(data["graphs"]),
                str(data["tokenizer"]),
                data.get("eos_token_id"),
            )
        except KeyError as err:
            raise ConfigError(
                f"malformed {path}: missing key {err.args[0]!r}; re-run `fleetune export onnx "
                "--force`"
            ) from err
        except (TypeError, ValueError) as err:  # ConfigError from the base or spec is a ValueError
            raise ConfigError(f"malformed {path}: {err}") from err

    def check(self) -> FlatLayout:
        """The layout the device derives must be the one the graph was exported with."""
        flat = FlatLayout(self.spec, self.base)
        if flat.entries != self.layout or flat.size != self.size:
            raise ConfigError(
                f"{self.root}: the exported adapter layout differs from "
                f"{self.spec} on {self.base.name}; re-run `fleetune export onnx`"
            )
        return flat


class OnnxBackend:
    """Loss and generation on onnxruntime with an adapter vector as a graph input.

    Use it as a context manager (or call :meth:`close`) to release the ORT sessions."""

    def __init__(
        self,
        artifacts: str | Path | OnnxArtifacts,
        base: BaseManifest | None = None,
        spec: LoraSpec | None = None,
        precision: str = "fp32",
        threads: int = 1,
    ) -> None:
        self.art = (
            artifacts if isinstance(artifacts, OnnxArtifacts) else OnnxArtifacts.load(artifacts)
        )
        if base is not None and base.sha256 != self.art.base.sha256:
            raise ConfigError(
                f"ONNX artifacts in {self.art.root} were exported from base "
                f"{self.art.base.short_hash}, the device runs {base.name} "
                f"({base.short_hash})"
            )
        if spec is not None and spec != self.art.spec:
            raise ConfigError(
                f"ONNX artifacts hold a {self.art.spec} adapter input, the device tunes {spec}"
            )
        if precision not in ("fp32", "int8") or precision not in self.art.graphs:
            raise ConfigError(
                f"no {precision} graph in {self.art.root}; have {sorted(self.art.graphs)}"
            )
        self.base, self.spec = self.art.base, self.art.spec
        self.layout = self.art.check()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session: ort.InferenceSession | None = None
        try:
            self.session = ort.InferenceSession(
                str(self.art.root / self.art.graphs[precision]),
                options,
                providers=["CPUExecutionProvider"],
            )
            self._tokenizer = Tokenizer.from_file(str(self.art.root / self.art.tokenizer))
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise BackendError(f"cannot load ONNX artifacts from {self.art.root}: {err}") from err
        self.flat = np.zeros(self.layout.size, dtype=np.float32)
        self._options = options
        self._generator: ort.InferenceSession | None = None  # logits graph, on first generate()

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def set_adapter(self, tensors: Tensors) -> None:
        check_layout(tensors, self.spec, self.base)
        self.flat = self.layout.flatten(tensors)

    def get_adapter(self) -> Tensors:
        return self.layout.unflatten(self.flat)

    def _check_flat(self, flat: np.ndarray) -> None:
        """An adapter vector must be float32 in the manifest's flat layout."""
        ok = isinstance(flat, np.ndarray) and flat.shape == (self.art.size,)
        if not ok or flat.dtype != np.float32:
            got = f"{flat.dtype} {flat.shape}" if isinstance(flat, np.ndarray) else type(flat)
            raise PayloadError(
                f"adapter vector must be float32 of length {self.art.size}, got {got}"
            )

    def _live_session(self) -> ort.InferenceSession:
        if self.session is None:
            raise BackendError(f"the ONNX backend on {self.art.root} is closed")
        return self.session

    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """Mean next-token loss of ``input_ids`` [batch, seq] with the adapter vector ``flat``."""
        self._check_flat(flat)
        session = self._live_session()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        try:
            (loss,) = session.run(
                ["loss"],
                {
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "labels": ids,
                    "adapter": flat,
                },
            )
        except Exception as err:
            raise BackendError(f"onnxruntime failed on a {ids.shape} batch: {err}") from err
        return float(loss)

    def loss(self, input_ids: np.ndarray) -> float:
        return self.loss_flat(input_ids, self.flat)

    def generate(
        self, prompt: str, max_new_tokens: int = 32, adapter: np.ndarray | None = None
    ) -> str:
        """Greedy continuation of ``prompt`` on the KV-cache decoder graph: one prefill call over
        the prompt, then one call per new token.

        ``adapter`` is a flat float32 vector in the manifest's layout (as for :meth:`loss_flat`);
        without it the current adapter (:meth:`set_adapter`) is used."""
        flat = self.flat if adapter is None else adapter
        self._check_flat(flat)
        self._live_session()
        if "decoder" not in self.art.graphs:
            raise ConfigError(f"no decoder graph in {self.art.root}: run `fleetune export onnx`")
        if self._generator is None:
            path = str(self.art.root / self.art.graphs["decoder"])
            try:
                self._generator = ort.InferenceSession(
                    path, self._options, providers=["CPUExecutionProvider"]
                )
            except Exception as err:
                raise BackendError(f"cannot load the decoder graph {path}: {err}") from err
        new = greedy(
            self._generator, self.tokenize(prompt), flat, max_new_tokens, self.art.eos_token_id
        )
        return self._tokenizer.decode(new, skip_special_tokens=True)

    def close(self) -> None:
        """Release the ORT sessions (safe to call twice); later calls raise ``BackendError``."""
        self.session = None
        self._generator = None

    def __enter__(self) -> OnnxBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def empty_past(session: ort.InferenceSession, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past.*`` inputs (``P = 0``) for the first (prefill) call."""
    past: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name.startswith("past."):
            _, kv_heads, _, head_dim = inp.shape  # [batch, kv_heads, past, head_dim]
            past[inp.name] = np.zeros((batch, int(kv_heads), 0, int(head_dim)), dtype=np.float32)
    return past


def greedy(
    session: ort.InferenceSession,
    tokenizer_ids: Sequence[int],
    adapter: np.ndarray,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy continuation of the prompt ``tokenizer_ids`` (batch 1); returns the new ids only.

    The first call feeds the whole prompt with an empty cache; each later call feeds one
    token and the ``present.*`` outputs of the previous call as ``past.*``.
    """
    past = empty_past(session)
    present_names = [name.replace("past.", "present.", 1) for name in past]
    output_names = ["logits", *present_names]
    ids = np.asarray([list(tokenizer_ids)], dtype=np.int64)
    seen = 0  # tokens already in the cache
    new: list[int] = []
    for _ in range(max_new_tokens):
        total = seen + ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(seen, total, dtype=np.int64)[None, :],
            "adapter": adapter,
            **past,
        }
        try:
            logits, *presents = session.run(output_names, feeds)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime failed generating after {seen} tokens: {err}") from err
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        if token == eos_token_id:
            break
        past = dict(zip(past, presents, strict=True))
        seen = total
        ids = np.asarray([[token]], dtype=np.int64)
    return new
