"""A layer window in llama.cpp: the prefix from the whole GGUF, the window as a GGUF of its own.
Long because it also writes that GGUF, streaming the base's header and tensors.

The states entering the window are read out of the base model's graph while it runs: a second
context on the same model carries an eval callback (``cb_eval``) that asks for the output of
the last layer below the window (``l_out-{start - 1}``), copies it, and stops the graph there,
so nothing above is computed. The steps run in a *window model*: a GGUF written on the device
from the base's (a second or less) that holds the window's layers renumbered from 0 with the
embedding table and the head, fed the cached states as input embeddings (``batch.embd``). Its
LoRA adapter is the window's, renumbered the same way (``write_lora_gguf(first=start)``). A
window device in a fleet whose adapter reaches below its window runs the prefix under the
fleet's adapter for those layers (``set_prefix_adapter``). Imports neither torch nor
transformers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.backends import Capabilities, StatesMemo, pairs_in_use, same_tensors
from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend, _ram_dir, row_loss
from fleetune.edge_sdk.errors import BackendError, BackendUnavailable, ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

Tensors = dict[str, np.ndarray]


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF types
_STRING, _ARRAY = 8, 9
_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_CHUNK = 4 << 20  # tensor bytes are copied this much at a time


def write_window_gguf(source: str | Path, start: int, out: str | Path) -> Path:
    """``source`` (a llama GGUF) with only its layers from ``start`` up, renumbered from 0,
    and everything that is not a layer (embeddings, final norm, head, tokenizer) as it is.

    Streams: the header is parsed as it is read and copied byte for byte (only
    ``{arch}.block_count`` changes), the tensors' bytes go across in 4 MB reads, so writing
    costs a few MB of memory rather than the whole model (gguf-py's reader and writer held
    ~200 MB at once: the window engine's peak, README)."""
    with open(source, "rb") as src, open(out, "wb") as dst:
        head = _GgufHeader(src, str(source))
        blocks = f"{head.arch}.block_count"
        layers = head.value(blocks)
        if not 0 < start < layers:
            raise ConfigError(f"a window from layer {start} of {source}'s {layers} layers")
        kept = []  # (new name, info bytes after the name, source offset, span)
        for name, info, offset, span in head.tensors:
            parts = name.split(".", 2)
            if parts[0] != "blk":
                kept.append((name, info, offset, span))
            elif int(parts[1]) >= start:
                kept.append((f"blk.{int(parts[1]) - start}.{parts[2]}", info, offset, span))
        dst.write(head.raw[:8] + struct.pack("<QQ", len(kept), len(head.kvs)))
        for key, vtype, begin, value_at, end in head.kvs:
            if key == blocks:
                dst.write(head.raw[begin:value_at] + struct.pack(_INTS[vtype], layers - start))
            else:
                dst.write(head.raw[begin:end])
        at = 0
        for name, info, _, span in kept:
            encoded = name.encode()
            dst.write(struct.pack("<Q", len(encoded)) + encoded + info + struct.pack("<Q", at))
            at += _aligned(span, head.alignment)
        dst.write(b"\0" * (_aligned(dst.tell(), head.alignment) - dst.tell()))
        for _, _, offset, span in kept:
            for done in range(0, span, _CHUNK):
                size = min(_CHUNK, span - done)
                chunk = os.pread(src.fileno(), size, head.data_start + offset + done)
                if len(chunk) != size:
                    raise BackendError(f"{source} ends inside its tensor data")
                dst.write(chunk)
            dst.write(b"\0" * (_aligned(span, head.alignment) - span))
    return Path(out)


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class _GgufHeader:
    """A GGUF file's key-value pairs and tensor table, read from its first bytes only: each
    pair's place in ``raw`` (key, value type, start, value start, end), each tensor's name,
    its info after the name (dims and type), its offset in the data and the bytes up to the
    next tensor's (its span, padding included)."""

    def __init__(self, fh: Any, name: str) -> None:
        self.raw, self.name, self._at = b"", name, 0
        self._fh = fh
        magic, version = self._take("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise BackendError(f"{name} is not a GGUF v2/v3 file (magic {magic!r}, v{version})")
        n_tensors, n_kvs = self._take("<QQ")
        self.kvs: list[tuple[str, int, int, int, int]] = []
        self._values: dict[str, tuple[int, int]] = {}
        for _ in range(n_kvs):
            begin = self._at
            key = self._string()
            (vtype,) = self._take("<I")
            value_at = self._at
            self._skip(vtype)
            self.kvs.append((key, vtype, begin, value_at, self._at))
            self._values[key] = (vtype, value_at)
        table = []
        for _ in range(n_tensors):
            tensor = self._string()
            info_at = self._at
            (n_dims,) = self._take("<I")
            self._take(f"<{n_dims}QI")
            info = self.raw[info_at : self._at]
            (offset,) = self._take("<Q")
            table.append((tensor, info, offset))
        self.alignment = (
            int(self.value("general.alignment")) if self.has("general.alignment") else 32
        )
        self.data_start = _aligned(self._at, self.alignment)
        data_size = os.fstat(fh.fileno()).st_size - self.data_start
        ends = sorted({offset for _, _, offset in table} | {data_size})
        self.tensors = [
            (tensor, info, offset, ends[ends.index(offset) + 1] - offset)
            for tensor, info, offset in table
        ]
        vtype, at = self._values.get("general.architecture", (None, 0))
        if vtype != _STRING:
            raise BackendError(f"{name} names no general.architecture")
        (size,) = struct.unpack_from("<Q", self.raw, at)
        self.arch = self.raw[at + 8 : at + 8 + size].decode()

    def has(self, key: str) -> bool:
        return key in self._values

    def value(self, key: str) -> int:
        """An integer value's."""
        vtype, at = self._values.get(key, (None, 0))
        if vtype not in _INTS:
            raise BackendError(f"{self.name}: {key} is missing or not an integer")
        return int(struct.unpack_from(_INTS[vtype], self.raw, at)[0])

    def _need(self, n: int) -> None:
        """Read on until ``raw`` holds ``n`` bytes past the cursor (the header only)."""
        short = self._at + n - len(self.raw)
        if short > 0:
            more = self._fh.read(max(short, 1 << 16))
            if len(more) < short:
                raise BackendError(f"{self.name} ends inside its GGUF header")
            self.raw += more

    def _take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        self._need(size)
        values = struct.unpack_from(fmt, self.raw, self._at)
        self._at += size
        return values

    def _string(self) -> str:
        (size,) = self._take("<Q")
        self._need(size)
        self._at += size
        return self.raw[self._at - size : self._at].decode("utf-8", "replace")

    def _skip(self, vtype: int, count: int = 1) -> None:
        if vtype in _SCALAR:
            self._need(_SCALAR[vtype] * count)
            self._at += _SCALAR[vtype] * count
        elif vtype == _STRING:
            for _ in range(count):
                (size,) = self._take("<Q")
                self._need(size)
                self._at += size
        elif vtype == _ARRAY:
            for _ in range(count):
                etype, n = self._take("<IQ")
                self._skip(etype, n)
        else:
            raise BackendError(f"{self.name}: unknown GGUF value type {vtype}")


class LlamaCppWindowBackend(LlamaCppBackend):
    """A window adapter's llama.cpp engine: the base model (prefix states, generation) and the
    window model (every loss, from prefix states)."""

    capabilities = Capabilities(generate=True, window=True, prefix_adapter=True)

    def __init__(
        self,
        gguf_path: str | Path,
        base: BaseManifest,
        spec: LoraSpec,
        threads: int = 1,
        n_ctx: int = 512,
    ) -> None:
        if not spec.window:
            raise ConfigError("the llama.cpp window engine needs lora_window = K > 0")
        self.window = spec.layers(base)
        # native handles beyond the base class's, freed by close()
        self.prefix_ctx: Any = None
        self.window_model: Any = None
        self.window_ctx: Any = None
        self.embd_batch: Any = None
        self._window_adapter: Any = None
        self._below_adapter: Any = None
        self._below_tensors: Tensors = {}  # the pairs in use below the window (pairs_in_use)
        self._full_stale = False  # the main context's adapter lags set_adapter (generate only)
        self._states = StatesMemo()
        self.prefix_version = 0
        super().__init__(gguf_path, base, spec, threads, n_ctx)
        try:
            self._open_window(threads, n_ctx)
        except BaseException:
            self.close()
            raise

    def _open_window(self, threads: int, n_ctx: int) -> None:
        lib, start = self.lib, self.window.start
        ggml = _ggml()
        wanted = f"l_out-{start - 1}".encode()
        self._captured: np.ndarray | None = None

        def capture(tensor: int, ask: bool, _: int) -> bool:
            if ask:
                return bool(ggml.ggml_get_name(tensor) == wanted)
            out = self._captured
            size = ggml.ggml_nbytes(tensor)
            if out is None or out.nbytes != size:
                return False  # not a decode this engine asked for: stop it
            ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, size)
            return False  # the layers above are not needed: stop the graph here

        self._callback = lib.ggml_backend_sched_eval_callback(capture)  # must outlive the ctx
        self.prefix_ctx = self._context(self.model, threads, n_ctx, self._callback)
        self._prefix_memory = lib.llama_get_memory(self.prefix_ctx)
        fd, name = tempfile.mkstemp(prefix="fleetune-window-", suffix=".gguf", dir=_ram_dir())
        os.close(fd)
        try:
            write_window_gguf(self.path, start, name)
            self.window_model = lib.llama_model_load_from_file(
                name.encode(), lib.llama_model_default_params()
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)  # mapped or copied by llama.cpp by now
        if not self.window_model:
            raise BackendError(f"llama.cpp could not load the window GGUF of {self.path.name}")
        self.window_ctx = self._context(self.window_model, threads, n_ctx)
        self._window_memory = lib.llama_get_memory(self.window_ctx)
        self.embd_batch = lib.llama_batch_init(n_ctx, self.n_embd, 1)
        if not (self.embd_batch.embd and self.embd_batch.pos and self.embd_batch.logits):
            raise BackendError(f"llama_batch_init could not allocate {n_ctx} embeddings")

    # -- adapters ------------------------------------------------------------------------------
    def set_adapter(self, tensors: Tensors) -> None:
        """Load the window's adapter into the window model (~5 ms); the base model's copy,
        used only to generate, is loaded when generation needs it."""
        check_layout(tensors, self.spec, self.base)
        adapter = self._load_lora(tensors, model=self.window_model, first=self.window.start)
        try:
            self._set_loras([adapter], [self._scale], self.window_ctx)
        except BackendError:
            self.lib.llama_adapter_lora_free(adapter)
            raise
        old, self._window_adapter = self._window_adapter, adapter
        if old:
            self.lib.llama_adapter_lora_free(old)
        self._tensors = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
        self._full_stale = True

    def set_prefix_adapter(self, tensors: Tensors) -> None:
        """The fleet's LoRA tensors of layers below the window (``PrefixAdapted``): active in
        the prefix context (and in generation); new ones drop the memo of prefix states."""
        below = pairs_in_use(tensors)
        if same_tensors(below, self._below_tensors):
            return
        adapter = None
        if below:  # every pair of the layers it spans goes into the GGUF adapter
            layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in below})
            adapter = self._load_lora(tensors, range(layers[0], layers[-1] + 1))
        self._set_loras([adapter] if adapter else [], [1.0] if adapter else [], self.prefix_ctx)
        old, self._below_adapter = self._below_adapter, adapter
        self._below_tensors = below
        if old:
            self.lib.llama_adapter_lora_free(old)
        self.prefix_version += 1
        self._states.clear()
        self._full_stale = True

    def set_scale(self, scale: float) -> None:
        super().set_scale(scale)
        if self._window_adapter:  # every loss runs in the window model
            self._set_loras([self._window_adapter], [self._scale], self.window_ctx)

    def _activate(self, adapter: Any, scale: float) -> None:
        below = [self._below_adapter] if self._below_adapter else []
        self._set_loras([adapter, *below], [scale, *[1.0] * len(below)])

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        if self._full_stale and self._tensors is not None:
            super().set_adapter(self._tensors)  # the window's adapter in the base model
            self._full_stale = False
        return super().generate(prompt, max_tokens)

    # -- the prefix and the window -------------------------------------------------------------
    def prefix(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        """The states entering layer ``start`` (the window's first) for each row of
        ``input_ids``: the base model's graph, stopped after layer ``start - 1``."""
        if start != self.window.start:
            raise ConfigError(f"this engine's window starts at layer {self.window.start}")
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        out = np.empty((*ids.shape, self.n_embd), dtype=np.float32)
        batch = self.batch
        for r, row in enumerate(ids):
            self.lib.llama_memory_clear(self._prefix_memory, True)
            batch.n_tokens = len(row)
            for i, token in enumerate(row.tolist()):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == len(row) - 1 else 0
            self._captured = out[r]
            try:
                rc = self.lib.llama_decode(self.prefix_ctx, batch)
            finally:
                self._captured = None
            if rc != 0:
                raise BackendError(f"llama_decode returned {rc} on a {len(row)}-token prefix")
        return out

    def window_loss_flat(
        self, hidden: np.ndarray, input_ids: np.ndarray, flat: np.ndarray
    ) -> float:
        self.set_adapter(self.layout.unflatten(flat))
        return self._window_loss(hidden, input_ids)

    def _window_loss(self, hidden: np.ndarray, input_ids: np.ndarray) -> float:
        """Mean next-token loss of the rows from their states entering the window, a decode
        per row (several rows as sequences of one decode measured no faster: README)."""
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch, total = self.embd_batch, 0.0
        for states, row in zip(np.asarray(hidden, dtype=np.float32), ids, strict=True):
            self.lib.llama_memory_clear(self._window_memory, True)
            n = len(row)
            batch.n_tokens = n
            ctypes.memmove(batch.embd, np.ascontiguousarray(states).ctypes.data, states.nbytes)
            for i in range(n):
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i, 1, 1
                batch.seq_id[i][0] = 0
            rc = self.lib.llama_decode(self.window_ctx, batch)
            if rc != 0:
                raise BackendError(f"llama_decode returned {rc} on {n} window states")
            ptr = self.lib.llama_get_logits(self.window_ctx)
            if not ptr:
                raise BackendError("llama_get_logits returned NULL in the window model")
            total += row_loss(np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)), row)
        return total / (ids.shape[0] * (ids.shape[1] - 1))

    def loss(self, input_ids: np.ndarray) -> float:
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        if ids.shape[1] < 2:
            raise ConfigError(f"loss needs windows of at least 2 tokens, got {ids.shape}")
        hidden = self._states.get(ids, lambda rows: self.prefix(rows, self.window.start))
        return self._window_loss(hidden, ids)

    def close(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is not None:
            for name in ("_window_adapter", "_below_adapter"):
                if getattr(self, name, None):
                    lib.llama_adapter_lora_free(getattr(self, name))
                    setattr(self, name, None)
            if getattr(self, "embd_batch", None) is not None:
                lib.llama_batch_free(self.embd_batch)
                self.embd_batch = None
            for name in ("window_ctx", "prefix_ctx"):
                if getattr(self, name, None):
                    lib.llama_free(getattr(self, name))
                    setattr(self, name, None)
            if getattr(self, "window_model", None):
                lib.llama_model_free(self.window_model)
                self.window_model = None
        super().close()


def _ggml() -> Any:
    """libggml's tensor accessors (name, size, copy out), typed once."""
    try:
        from llama_cpp._ggml import libggml
    except ImportError as err:
        raise BackendUnavailable(
            "the llamacpp backend needs: pip install 'fleetune[llamacpp]'"
        ) from err
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_nbytes.restype = ctypes.c_size_t
    libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    return libggml
