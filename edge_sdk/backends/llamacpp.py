"""llama.cpp engine through llama-cpp-python's low-level bindings: a (quantized) GGUF base, the
LoRA adapter hot-swapped as a GGUF adapter file, and a control vector as a second, cheaper way to
steer. Imports neither torch nor transformers; tokenization uses the GGUF's own vocabulary.
Long because it owns every native handle and call (model, context, batch, adapters, memory).

The base comes in a GGUF bundle (``fleetune export gguf``); an adapter is written with
``edge_sdk.adapters.lora.gguf.write_lora_gguf`` to a file in RAM, loaded with
``llama_adapter_lora_init`` and swapped in without reloading the model (~7 ms for the default
adapter).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.adapters.lora.gguf import write_lora_gguf
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.backends import Capabilities
from fleetune.edge_sdk.errors import BackendError, BackendUnavailable, ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]
_INIT: dict[str, object] = {}


def init_llama() -> ModuleType:
    """Import llama_cpp once, silence llama.cpp's own logging and initialise its backend."""
    try:
        import llama_cpp
    except ImportError as err:
        raise BackendUnavailable(
            "the llamacpp backend needs: pip install 'fleetune[llamacpp]'"
        ) from err
    if "log" not in _INIT:
        # the callback must outlive every native call: keep it in a module-level dict
        _INIT["log"] = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_INIT["log"], ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def row_loss(logits: np.ndarray, row: np.ndarray) -> float:
    """Summed next-token cross-entropy of one sequence from its [seq, vocab] logits (float32
    logits, the normalizer summed in float64)."""
    logits = logits[:-1]
    peak = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=1, dtype=np.float64)) + peak[:, 0]
    return float(np.sum(lse - logits[np.arange(len(row) - 1), row[1:]]))


def _ram_dir() -> str:
    """Where adapter files go: /dev/shm where it exists (never touches flash), else tmp."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class LlamaCppBackend:
    """Loss, generation and adapter hot-swap on one llama.cpp model and context."""

    capabilities = Capabilities(adapter_scales=True, generate=True)

    def __init__(
        self,
        gguf_path: str | Path,
        base: BaseManifest,
        spec: LoraSpec,
        threads: int = 1,
        n_ctx: int = 512,
    ) -> None:
        self.lib: Any = init_llama()
        self.base, self.spec = base, spec
        self.layout = FlatLayout(spec, base)
        self.path = Path(gguf_path)
        # native handles (ctypes pointers and a llama_batch struct), freed by close()
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        self.vocab: Any = None  # owned by the model
        self._adapter: Any = None
        self._pieces: list[Any] = []  # adapters of a mixture, loaded once (load_pieces)
        self._memory: Any = None
        self.n_ctx = self.n_layer = self.n_embd = self.n_vocab = 0
        self._scale = 1.0
        self._tensors: Tensors | None = None
        self._check_file(self.path)
        lib = self.lib
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise BackendError(
                f"llama_model_load_from_file could not load {self.path}: corrupt, truncated or "
                "not a model GGUF"
            )
        try:
            self._open_context(threads, n_ctx)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_file(path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as err:
            raise BackendError(f"cannot read GGUF {path}: {err}") from err
        if magic != b"GGUF":
            raise BackendError(f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")

    def _open_context(self, threads: int, n_ctx: int) -> None:
        lib = self.lib
        n_layer = lib.llama_model_n_layer(self.model)
        self.n_embd = lib.llama_model_n_embd(self.model)
        if (n_layer, self.n_embd) != (self.base.num_layers, self.base.hidden_size):
            raise ConfigError(
                f"{self.path.name} has {n_layer} layers x {self.n_embd}, base {self.base.name} "
                f"has {self.base.num_layers} x {self.base.hidden_size}"
            )
        self.n_layer = n_layer
        self.vocab = lib.llama_model_get_vocab(self.model)
        if not self.vocab:
            raise BackendError(f"llama_model_get_vocab returned NULL for {self.path.name}")
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = self._context(self.model, threads, n_ctx)
        self.n_ctx = n_ctx
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)  # a struct of malloc'd arrays
        if not (self.batch.token and self.batch.pos and self.batch.seq_id and self.batch.logits):
            raise BackendError(f"llama_batch_init could not allocate a batch of {n_ctx} tokens")
        self._memory = lib.llama_get_memory(self.ctx)
        if not self._memory:
            raise BackendError(f"llama_get_memory returned NULL for {self.path.name}")

    def _context(self, model: Any, threads: int, n_ctx: int, callback: Any = None) -> Any:
        """A context on ``model``: one sequence of up to ``n_ctx`` tokens in one batch,
        ``callback`` as its eval callback (``cb_eval``) if given."""
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        if callback is not None:
            params.cb_eval = callback
        ctx = self.lib.llama_init_from_model(model, params)
        if not ctx:
            raise BackendError(f"llama_init_from_model failed for {self.path.name} (n_ctx={n_ctx})")
        return ctx

    def _check_open(self) -> None:
        """Native calls on freed handles crash the process: refuse them after :meth:`close`."""
        if not (self.ctx and self.model and self.vocab):
            raise BackendError(f"the llama.cpp backend on {self.path.name} is closed")

    # tokens and text

    def tokenize(self, text: str) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        size = len(data) + 16
        for _ in range(2):
            buf = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, False, False)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise BackendError(f"llama_tokenize failed on {len(data)} bytes of text")

    def detokenize(self, ids: list[int]) -> str:
        self._check_open()
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for token in ids:
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # the piece needs -n bytes: grow the buffer once and ask again
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                raise BackendError(
                    f"llama_token_to_piece failed on token {token} ({-n} bytes needed)"
                )
            out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    # adapters

    def _load_lora(
        self, tensors: Tensors, layers: range | None = None, model: Any = None, first: int = 0
    ) -> Any:
        """Write ``tensors`` (only ``layers``, if given) as a GGUF adapter in RAM and load it
        for ``model`` (the base's, or a window's whose ``blk.0`` is layer ``first``)."""
        self._check_open()
        directory = _ram_dir()
        try:
            fd, name = tempfile.mkstemp(prefix="fleetune-lora-", suffix=".gguf", dir=directory)
            os.close(fd)
        except OSError as err:
            raise BackendError(f"cannot create an adapter file in {directory}: {err}") from err
        try:
            write_lora_gguf(tensors, self.spec, self.base, name, False, layers, first)
            adapter = self.lib.llama_adapter_lora_init(model or self.model, name.encode())
        except OSError as err:  # e.g. /dev/shm is full
            raise BackendError(f"cannot write the GGUF adapter {name}: {err}") from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)  # llama.cpp copied the weights into its own buffers
        if not adapter:
            raise BackendError(
                f"llama_adapter_lora_init refused the adapter written for {self.base.name}"
            )
        return adapter

    def set_adapter(self, tensors: Tensors) -> None:
        """Write ``tensors`` as a GGUF adapter in RAM, load it, activate it, free the old one."""

        check_layout(tensors, self.spec, self.base)
        adapter = self._load_lora(tensors)
        try:
            self._activate(adapter, self._scale)
        except BackendError:
            self.lib.llama_adapter_lora_free(adapter)
            raise
        old, self._adapter = self._adapter, adapter
        if old:
            self.lib.llama_adapter_lora_free(old)
        self._tensors = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}

    def _activate(self, adapter: Any, scale: float) -> None:
        self._set_loras([adapter], [scale])

    def _set_loras(self, adapters: list[Any], scales: list[float], ctx: Any = None) -> None:
        """Make exactly ``adapters`` active in ``ctx`` (the main context by default), each with
        its scale (one native call)."""
        self._check_open()
        n = len(adapters)
        arr = (self.lib.llama_adapter_lora_p_ctypes * n)(*adapters)
        values = (ctypes.c_float * n)(*scales)
        rc = self.lib.llama_set_adapters_lora(ctx or self.ctx, arr, n, values)
        if rc != 0:
            raise BackendError(f"llama_set_adapters_lora returned {rc} for {n} adapters")

    def load_pieces(self, pieces: list[tuple[Tensors, range]]) -> None:
        """Load the adapters of a mixture once, each for its layers only (``Mixer.pieces``);
        :meth:`set_mix` then switches coefficients without loading anything."""
        self._free_pieces()
        for tensors, layers in pieces:
            check_layout(tensors, self.spec, self.base)
            self._pieces.append(self._load_lora(tensors, layers))

    def set_mix(self, scales: np.ndarray) -> None:
        """Activate the loaded pieces with ``scales`` (one per piece): the model then runs
        ``sum_i scales[i] * piece_i`` (~0.1 ms, no reload)."""
        scales = np.asarray(scales, dtype=np.float32).reshape(-1)
        if scales.size != len(self._pieces) or not len(self._pieces):
            raise ConfigError(f"{scales.size} scales for {len(self._pieces)} loaded pieces")
        if not np.all(np.isfinite(scales)):
            raise PayloadError("mixture scales must be finite")
        self._set_loras(self._pieces, scales.tolist())

    def _free_pieces(self) -> None:
        if self._pieces:
            if self._adapter:
                self._activate(self._adapter, self._scale)
            else:
                self._set_loras([], [])
        for piece in self._pieces:
            self.lib.llama_adapter_lora_free(piece)
        self._pieces = []

    def get_adapter(self) -> Tensors:
        if self._tensors is None:
            from fleetune.edge_sdk.adapters.lora import init_lora

            return init_lora(self.spec, self.base)
        return {k: v.copy() for k, v in self._tensors.items()}

    def set_scale(self, scale: float) -> None:
        """Multiply the active adapter's effect by ``scale`` (1.0: as tuned; 0.0: the base)."""
        if not np.isfinite(scale):
            raise ConfigError(f"adapter scale must be finite, got {scale}")
        self._scale = float(scale)
        if self._adapter:
            self._activate(self._adapter, self._scale)

    def set_cvec(self, vec: np.ndarray | None) -> None:
        """Add ``vec[i]`` to the residual stream after decoder layer ``i`` (``None`` clears it).

        llama.cpp never steers layer 0, so ``vec[0]`` must be zero."""
        self._check_open()
        lib = self.lib
        if vec is None:
            rc = lib.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            if vec.shape != (self.n_layer, self.n_embd):
                raise PayloadError(
                    f"control vector must be [{self.n_layer}, {self.n_embd}], got {vec.shape}"
                )
            if np.any(vec[0]) or not np.all(np.isfinite(vec)):
                raise PayloadError("control vector row 0 must be zero and every entry finite")
            data = vec[1:]
            rc = lib.llama_set_adapter_cvec(
                self.ctx,
                data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                data.size,
                self.n_embd,
                1,
                self.n_layer - 1,
            )
        if rc != 0:
            raise BackendError(f"llama_set_adapter_cvec returned {rc}")

    # evaluation

    def _decode(self, ids: np.ndarray, all_logits: bool, start: int = 0) -> None:
        """Decode ``ids`` at positions ``start..``; logits for every token or only the last."""
        self._check_open()
        n = len(ids)
        if start + n > self.n_ctx:
            raise ConfigError(f"{start + n} tokens exceed the context of {self.n_ctx}")
        if start == 0:
            self.lib.llama_memory_clear(self._memory, True)
        batch = self.batch
        batch.n_tokens = n
        for i, token in enumerate(ids.tolist()):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if all_logits or i == n - 1 else 0
        rc = self.lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise BackendError(f"llama_decode returned {rc} on {n} tokens")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[seq, vocab] logits of one sequence (a copy)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._decode(ids, all_logits=True)
        ptr = self.lib.llama_get_logits(self.ctx)
        if not ptr:
            raise BackendError("llama_get_logits returned NULL")
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab)).copy()

    def loss(self, input_ids: np.ndarray) -> float:
        """Mean next-token cross-entropy of [batch, seq] windows under the current adapter."""
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        if ids.shape[1] < 2:
            raise ConfigError(f"loss needs windows of at least 2 tokens, got {ids.shape}")
        total, count = 0.0, 0
        for row in ids:
            total += row_loss(self.logits(row), row)
            count += len(row) - 1
        return total / count

    def loss_flat(self, input_ids: np.ndarray, flat: np.ndarray) -> float:
        """Loss with the adapter vector ``flat`` (``FlatLayout`` order), swapped in first."""
        if flat.shape != (self.layout.size,):
            raise PayloadError(
                f"adapter vector must have length {self.layout.size}, got {flat.shape}"
            )
        self.set_adapter(self.layout.unflatten(flat))
        return self.loss(input_ids)

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        """Greedy continuation of ``prompt``: at most ``max_tokens`` tokens, fewer at an
        end-of-generation token or when the context (``n_ctx``) is full."""
        ids = np.asarray(self.tokenize(prompt), dtype=np.int64)
        if len(ids) == 0:
            raise ConfigError("generate needs a non-empty prompt")
        out: list[int] = []
        pos = 0
        for _ in range(max_tokens):
            self._decode(ids, all_logits=False, start=pos)
            pos += len(ids)
            ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
            if not ptr:
                raise BackendError(f"llama_get_logits_ith returned NULL after {pos} tokens")
            token = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))
            if self.lib.llama_vocab_is_eog(self.vocab, token):
                break
            # the token was predicted at position pos - 1, so it is kept even when the context
            # is now full; only decoding it (to predict one more) would not fit
            out.append(token)
            if pos >= self.n_ctx:
                break
            ids = np.asarray([token], dtype=np.int64)
        return self.detokenize(out)

    # lifetime

    def close(self) -> None:
        """Free the adapter, batch, context and model (safe to call twice)."""
        lib = self.lib
        for piece in self._pieces:
            lib.llama_adapter_lora_free(piece)
        self._pieces = []
        if self._adapter:
            lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        self.vocab = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "lib", None) is not None:
            self.close()
