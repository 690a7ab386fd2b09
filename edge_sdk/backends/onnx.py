"""ONNX Runtime engine: the base (int8 weights) with the LoRA adapter as one flat fp32 graph
input, the loss computed inside the graph. A bundle exported for a layer window
(``fleetune export onnx --window K``) also holds a prefix graph (``input_ids -> hidden`` below
the window, int8 weights) and a window graph (``hidden, labels, adapter -> loss``): such an
engine caches the prefix's states and runs every step in the window alone. Imports neither
torch nor transformers: tokenization uses ``tokenizers``. The graphs come in a bundle that
``fleetune export onnx`` wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.backends import Capabilities, StatesMemo
from fleetune.edge_sdk.bundle import Bundle
from fleetune.edge_sdk.errors import BackendError, BackendUnavailable, ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest

try:
    import onnxruntime as ort
    from tokenizers import Tokenizer
except ImportError as err:  # pragma: no cover - depends on the extra
    raise BackendUnavailable("the onnx backend needs: pip install 'fleetune[onnx]'") from err

Tensors = dict[str, np.ndarray]


class OnnxBackend:
    """Loss and generation on onnxruntime with an adapter vector as a graph input.

    Use it as a context manager (or call :meth:`close`) to release the ORT sessions."""

    capabilities = Capabilities(generate=True)

    def __init__(
        self,
        bundle: str | Path | Bundle,
        base: BaseManifest | None = None,
        spec: LoraSpec | None = None,
        precision: str = "fp32",
        threads: int = 1,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, "onnx")
        self.bundle.check(base, spec)
        if self.bundle.adapter is None:
            raise ConfigError(f"the ONNX bundle in {self.bundle.root} names no adapter input")
        if precision not in ("fp32", "int8"):
            raise ConfigError(f"ONNX precision {precision!r} is not fp32 or int8")
        self.base, self.spec = self.bundle.base, self.bundle.adapter
        self.layout = FlatLayout(self.spec, self.base)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options, self.precision, self._closed = options, precision, False
        window = f"window_{precision}" in self.bundle.files and self.spec.window > 0
        self.capabilities = Capabilities(generate=True, window=window)
        self._start = self.spec.layers(self.base).start  # the first layer of the window
        # graphs load on first use; a window engine scores through its prefix and window graphs
        # and never loads the full loss graph
        self._sessions: dict[str, ort.InferenceSession] = {}
        # prefix states of the windows loss_flat scored (held-out, validation: fixed per dataset)
        self._states = StatesMemo()  # prefix states of scored windows (window bundles)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.bundle.root / self.bundle.tokenizer))
        except Exception as err:
            raise BackendError(f"cannot load the ONNX bundle in {self.bundle.root}: {err}") from err
        self._session("window" if window else "loss")  # a broken bundle fails here, not later
        self.flat = np.zeros(self.layout.size, dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def set_adapter(self, tensors: Tensors) -> None:
        check_layout(tensors, self.spec, self.base)
        self.flat = self.layout.flatten(tensors)

    def get_adapter(self) -> Tensors:
        return self.layout.unflatten(self.flat)

    def _check_flat(self, flat: np.ndarray) -> None:
        """An adapter vector must be float32 in the manifest's flat layout."""
        ok = isinstance(flat, np.ndarray) and flat.shape == (self.layout.size,)
        if not ok or flat.dtype != np.float32:
            got = f"{flat.dtype} {flat.shape}" if isinstance(flat, np.ndarray) else type(flat)
            raise PayloadError(
                f"adapter vector must be float32 of length {self.layout.size}, got {got}"
            )

    def _session(self, kind: str) -> ort.InferenceSession:
        """The bundle's ``loss`` graph (in this engine's precision), ``decoder``, ``window`` (in
        this precision) or ``prefix`` (int8 weights when the bundle has them: it runs once per
        dataset, so memory matters more than its speed), loaded on first use."""
        if self._closed:
            raise BackendError(f"the ONNX backend on {self.bundle.root} is closed")
        if kind not in self._sessions:
            if kind in ("prefix", "window") and not self.capabilities.window:
                raise ConfigError(
                    f"the ONNX bundle in {self.bundle.root} has no {kind} graph for "
                    f"{self.precision}: export it with `fleetune export onnx --window K`"
                )
            role = {"loss": self.precision, "window": f"window_{self.precision}"}.get(kind, kind)
            if kind == "prefix":
                role = "prefix_int8" if "prefix_int8" in self.bundle.files else "prefix_fp32"
            path = str(self.bundle.path(role))
            try:
                self._sessions[kind] = ort.InferenceSession(
                    path, self._options, providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # onnxruntime raises its own untyped errors
                raise BackendError(f"cannot load the {kind} graph {path}: {err}") from err
        return self._sessions[kind]

    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """Mean next-token loss of ``input_ids`` [batch, seq] with the adapter vector ``flat``
        (a window engine: the prefix graph, then the window graph)."""
        self._check_flat(flat)
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if self.capabilities.window:
            return self._window_loss(self._prefix_states(ids), ids, flat)
        session = self._session("loss")
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

    # -- a layer window over cached prefix states (tuners/window.py) ----------------------------
    def prefix(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        """The states entering the adapter's window (float32 [batch, tokens, hidden]); the
        prefix graph was exported for one window, so ``start`` must be its first layer."""
        if start != self._start:
            raise ConfigError(
                f"this bundle's prefix graph ends at layer {self._start}, not {start}"
            )
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        try:
            (hidden,) = self._session("prefix").run(["hidden"], {"input_ids": ids})
        except Exception as err:
            raise BackendError(f"onnxruntime failed on a {ids.shape} prefix: {err}") from err
        return np.asarray(hidden)

    def _prefix_states(self, ids: np.ndarray) -> np.ndarray:
        """The states entering the window for ``ids``, from the prefix graph the first time."""
        return self._states.get(ids, lambda rows: self.prefix(rows, self._start))

    def window_loss_flat(
        self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray
    ) -> float:
        """The loss from cached states entering the window (its layers, norm and head) with
        the adapter vector ``flat``: the full model's loss for the same tokens and adapter.

        A tuner steps from cached states, so the prefix graph leaves memory here (it loads
        again if a window not scored before needs it): the device then holds the window's
        weights and activations, not the prefix's as well."""
        self._sessions.pop("prefix", None)
        return self._window_loss(hidden, input_ids, flat)

    def _window_loss(self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray) -> float:
        self._check_flat(flat)
        feeds = {
            "hidden": np.ascontiguousarray(hidden, dtype=np.float32),
            "labels": np.ascontiguousarray(input_ids, dtype=np.int64),
            "adapter": flat,
        }
        try:
            (loss,) = self._session("window").run(["loss"], feeds)
        except Exception as err:
            raise BackendError(f"onnxruntime failed on a {hidden.shape} window: {err}") from err
        return float(loss)

    def generate(
        self, prompt: str, max_new_tokens: int = 32, adapter: np.ndarray | None = None
    ) -> str:
        """Greedy continuation of ``prompt`` on the KV-cache decoder graph: one prefill call over
        the prompt, then one call per new token.

        ``adapter`` is a flat float32 vector in the manifest's layout (as for :meth:`loss_flat`);
        without it the current adapter (:meth:`set_adapter`) is used."""
        flat = self.flat if adapter is None else adapter
        self._check_flat(flat)
        new = greedy(
            self._session("decoder"),
            self.tokenize(prompt),
            flat,
            max_new_tokens,
            self.bundle.eos_token_id,
        )
        return self._tokenizer.decode(new, skip_special_tokens=True)

    def close(self) -> None:
        """Release the ORT sessions (safe to call twice); later calls raise ``BackendError``."""
        self._closed = True
        self._sessions = {}
        self._states.clear()

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
