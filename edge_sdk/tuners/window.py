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
the layers below from the checkpoint, one at a time, into the cache), and ONNX Runtime on a
bundle exported with the window (``fleetune export onnx --window K``: an int8 prefix graph
builds the cache, an fp32 or int8 window graph runs the steps, no torch). Backprop in the
window is torch's alone.

The cache holds ``windows x tokens x hidden`` float32 values (SmolLM2, 64 tokens: 147 KB per
window of text); :class:`PrefixCache` keeps it in RAM or in a file on disk (``np.memmap``) and
says how large it is.
"""

from __future__ import annotations

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


@dataclass
class PrefixCache:
    """The states entering the window for each row of ``ids`` (``[rows, tokens, hidden]``)."""

    ids: np.ndarray
    hidden: np.ndarray
    where: str  # "ram" or the file that holds it
    seconds: float  # to compute it

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes)


def build_cache(
    backend: WindowBackend,
    ids: np.ndarray,
    path: str | Path | None = None,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PrefixCache:
    """Run the frozen layers below the adapter's window over every row of ``ids`` once; in RAM,
    or in the file ``path`` (a memory map: the OS pages it in and out). ``progress(done,
    total)`` counts rows, or layers where the engine streams its prefix."""
    start = backend.spec.layers(backend.base).start
    began = time.monotonic()
    shape = (len(ids), ids.shape[1], backend.base.hidden_size)
    if path is None:
        hidden = np.empty(shape, dtype=np.float32)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        hidden = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    if backend.capabilities.streamed_prefix:  # the lean torch engine: a layer at a time
        cast("StreamedBackend", backend).prefix_into(ids, start, hidden, progress)
    else:
        for i in range(0, len(ids), batch):
            hidden[i : i + batch] = backend.prefix(ids[i : i + batch], start)
            if progress is not None:
                progress(min(i + batch, len(ids)), len(ids))
    if path is not None:
        hidden.flush()  # type: ignore[attr-defined]
    where = "ram" if path is None else str(path)
    return PrefixCache(ids, hidden, where, time.monotonic() - began)


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
        metrics["cache_mb"] = cache.nbytes / 2**20
        local = backend.get_adapter()
        return Tuned(local, metrics, delta={k: local[k] - start[k] for k in local})
