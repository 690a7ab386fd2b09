"""Layer-window tuning: LoRA on the top ``window`` decoder layers only (``LoraSpec.window``), the
layers below run once per local dataset and their output is cached.

Nothing below the window changes during tuning, so the hidden states entering it are a fixed
function of the tokens: :func:`build_cache` computes them once (the frozen prefix), and every
step after that runs only the window's layers, the final norm and the head, forward-only
(:func:`window_zo`, SPSA with the round's seed pool) or with backprop through the window alone
(:func:`window_backprop`). A step then costs the window's share of the layers plus the head
(SmolLM2-135M: 30 layers and a 49,152-token head, ~21% of a forward's FLOPs).

Engines with ``capabilities.window`` run it: torch (what a device with a window opens is the
lean engine, ``backends/torch_window.py``: it holds only the window and the head and streams
the layers below from the checkpoint, one at a time, into the cache), ONNX Runtime on a
bundle exported with the window (``fleetune export onnx --window K``: an int8 prefix graph
builds the cache, an fp32 or int8 window graph runs the steps, no torch), and llama.cpp
(``backends/llamacpp_window.py``: the base GGUF's graph stopped below the window builds the
cache, a GGUF of the window's layers runs the steps). Backprop in the window is torch's alone.

The cache holds ``windows x tokens x hidden`` float32 values (SmolLM2, 64 tokens: 147 KB per
window of text); :class:`PrefixCache` keeps it in RAM or in a file on disk and says how large it
is and where. On disk it is written a chunk of rows at a time and read back a step's rows at a
time (:class:`DiskStates`), so it never enters the resident set whole; a device under a memory
budget puts it there when its step's estimate and the cache together would not fit
(``LocalTuner.prefix_cache``). A window of every layer has no prefix: its states are embedding
rows, which the lean torch engine looks up a step's rows at a time instead (:class:`LookedUp`,
no cache at all).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.tuners.backprop import tune_backprop
from fleetune.edge_sdk.tuners.base import Job, LocalTuner, Progress, Tensors, Tuned
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import Backend, StreamedBackend, WindowBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.data import ClientData


CHUNK_ROWS = 64  # rows a streamed prefix runs at once into a file (9 MB of SmolLM2 states)


class DiskStates:
    """Prefix states ``[rows, tokens, hidden]`` float32 in a file, read a few rows at a time
    with ``os.pread``: nothing is mapped, so what a step reads is all of the file that enters
    the resident set (a memory map keeps every page a step has touched resident)."""

    dtype = np.dtype(np.float32)

    def __init__(self, path: str | Path, shape: tuple[int, int, int]) -> None:
        self.path, self.shape = Path(path), shape
        self._row = shape[1] * shape[2] * 4
        if self.path.stat().st_size != shape[0] * self._row:
            raise OSError(f"{self.path} holds {self.path.stat().st_size} bytes, not {shape}")
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | slice | np.ndarray) -> np.ndarray:
        """Rows by index, slice or index array (numpy's rules), copied out."""
        if self._fd is None:
            raise OSError(f"the prefix states in {self.path} are closed")
        index = np.arange(self.shape[0])[rows]
        flat = np.atleast_1d(index)
        out = np.empty((len(flat), *self.shape[1:]), dtype=np.float32)
        for i, row in enumerate(flat.tolist()):
            data = os.pread(self._fd, self._row, row * self._row)
            out[i] = np.frombuffer(data, dtype=np.float32).reshape(self.shape[1:])
        return out.reshape(*np.shape(index), *self.shape[1:])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LookedUp:
    """The states entering a window that starts at layer 0: the embedding rows of ``ids``,
    looked up when a step asks for them (the engine holds the table anyway; SmolLM2 states
    cached would take 147 KB per window of text for nothing)."""

    nbytes = 0

    def __init__(self, backend: WindowBackend, ids: np.ndarray) -> None:
        self.backend, self.ids = backend, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: int | slice | np.ndarray) -> np.ndarray:
        ids = self.ids[rows]
        states = self.backend.prefix(ids.reshape(-1, ids.shape[-1]), 0)
        return states.reshape(*ids.shape, states.shape[-1])


@dataclass
class PrefixCache:
    """The states entering the window for each row of ``ids`` (``[rows, tokens, hidden]``)."""

    ids: np.ndarray
    hidden: np.ndarray | DiskStates | LookedUp
    where: str  # "ram", the file that holds it, or "lookup" (nothing cached: LookedUp)
    seconds: float  # to compute it

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes)

    def metrics(self) -> dict:
        """Its size and where it lives, for the round's report."""
        on_disk = isinstance(self.hidden, DiskStates)
        return {"cache_mb": self.nbytes / 2**20, "cache_on_disk": on_disk}

    def close(self) -> None:
        """Drop a cache on disk: its file goes."""
        if isinstance(self.hidden, DiskStates):
            self.hidden.close()
            self.hidden.path.unlink(missing_ok=True)


def looks_up(backend: WindowBackend) -> bool:
    """Whether the engine looks a window's states up per step instead of caching them: the
    lean torch engine, its window starting at layer 0."""
    start = backend.spec.layers(backend.base).start
    return start == 0 and backend.capabilities.streamed_prefix


def cache_mb(backend: WindowBackend, rows: int, tokens: int) -> float:
    """What a cache of ``rows`` windows of ``tokens`` takes (float32 states; none looked up)."""
    return 0.0 if looks_up(backend) else rows * tokens * backend.base.hidden_size * 4 / 2**20


def build_cache(
    backend: WindowBackend,
    ids: np.ndarray,
    path: str | Path | None = None,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PrefixCache:
    """Run the frozen layers below the adapter's window over every row of ``ids`` once; in RAM,
    or in the file ``path`` (written a chunk at a time, read back by :class:`DiskStates`).
    ``progress(done, total)`` counts rows, or layers where the engine streams its prefix into
    RAM."""
    start = backend.spec.layers(backend.base).start
    began = time.monotonic()
    if looks_up(backend):
        return PrefixCache(ids, LookedUp(backend, ids), "lookup", 0.0)
    shape = (len(ids), ids.shape[1], backend.base.hidden_size)
    streamed = backend.capabilities.streamed_prefix  # the lean torch engine: a layer at a time
    if path is None:
        hidden = np.empty(shape, dtype=np.float32)
        if streamed:
            cast("StreamedBackend", backend).prefix_into(ids, start, hidden, progress)
        else:
            for i in range(0, len(ids), batch):
                hidden[i : i + batch] = backend.prefix(ids[i : i + batch], start)
                if progress is not None:
                    progress(min(i + batch, len(ids)), len(ids))
        return PrefixCache(ids, hidden, "ram", time.monotonic() - began)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    step = CHUNK_ROWS if streamed else batch  # streamed: every prefix layer read once per chunk
    try:
        with open(part, "wb") as f:
            for i in range(0, len(ids), step):
                rows = ids[i : i + step]
                if streamed:
                    chunk = np.empty((len(rows), *shape[1:]), dtype=np.float32)
                    cast("StreamedBackend", backend).prefix_into(rows, start, chunk)
                else:
                    chunk = np.ascontiguousarray(backend.prefix(rows, start), dtype=np.float32)
                f.write(chunk.tobytes())
                if progress is not None:
                    progress(min(i + step, len(ids)), len(ids))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return PrefixCache(ids, DiskStates(path, shape), str(path), time.monotonic() - began)


def window_zo(
    backend: WindowBackend,
    cache: PrefixCache,
    theta: np.ndarray,
    tuned: np.ndarray,
    steps: int,
    config: ZOConfig,
    rng: np.random.Generator,
    batch_size: int = 4,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[list[tuple[int, float]], dict]:
    """SPSA steps (``zo_tune``) whose forwards start from the cached states; ``theta`` is the
    window adapter's flat vector, moved in place. Returns the seed run's pairs and metrics."""
    rows = [rng.choice(len(cache.ids), batch_size, replace=False) for _ in range(steps)]

    def loss(th: np.ndarray, step: int) -> float:
        pick = np.sort(rows[step])
        return backend.window_loss_flat(cache.hidden[pick], cache.ids[pick], th)

    return zo_tune(loss, theta, tuned, steps, config, rng, progress)


def window_backprop(
    backend: TorchBackend | TorchWindowBackend,
    cache: PrefixCache,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    seconds: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    params: str = "all",
) -> dict:
    """AdamW on the window's LoRA weights (``params``: all, or lora_b), gradients through the
    window only (``steps``, or fewer when ``seconds`` of wall-clock run out)."""
    return tune_backprop(
        backend,
        cache.ids,
        steps,
        lr,
        batch_size,
        seed,
        progress,
        params,
        seconds,
        loss_of=lambda rows: backend.window_loss_tensor(cache.hidden[rows], cache.ids[rows]),
    )


class WindowTuner(LocalTuner):
    """AdamW through the adapter's layer window only (``[tuning] tuner = "window"`` with
    ``lora_window = K``), from prefix states cached once per dataset; uploads the dense delta
    of the window's LoRA weights like the backprop tuner."""

    name = "window"

    def tune(
        self,
        backend: Backend,
        data: ClientData,
        start: Tensors,
        job: Job,
        progress: Progress | None = None,
    ) -> Tuned:
        cache = self.prefix_cache(backend, data.train) if backend.capabilities.backprop else None
        if cache is None:
            raise ConfigError(
                f'tuner = "window" (backprop in the window) needs the torch engine and '
                f"lora_window = K > 0; {type(backend).__name__} does not backprop: use "
                'tuner = "zo" with lora_window = K for forward-only steps in the window'
            )
        t = self.config
        backend.set_adapter(start)
        metrics = window_backprop(
            backend,  # type: ignore[arg-type]  # prefix_cache checked it has windows
            cache,
            t.steps,
            t.lr,
            t.batch_size,
            job.seed(t.seed),
            progress=progress,
            params=t.backprop_params,
        )
        metrics.update(cache.metrics())
        local = backend.get_adapter()
        return Tuned(local, metrics, delta={k: local[k] - start[k] for k in local})
