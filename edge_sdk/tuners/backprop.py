"""The reference tuner: AdamW backprop on the LoRA weights (torch backend only)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.tuners.base import Job, LocalTuner, Progress, Tensors, Tuned

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import Backend, TrainableBackend
    from fleetune.edge_sdk.data import ClientData

log = logging.getLogger(__name__)


class AdamW:
    """``torch.optim.AdamW``'s update (Loshchilov & Hutter, ICLR 2019), the same operations in
    the same order, without ``torch.optim``: constructing any torch optimizer imports
    ``torch._dynamo`` (about 70 MB resident on torch 2.13), which a device tuning a layer window
    under a memory budget cannot spare."""

    def __init__(
        self,
        params: list[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        import torch

        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.weight_decay, self.steps = weight_decay, 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.zero_grad()

    def zero_grad(self) -> None:
        """Zero the gradients in place, allocated once next to the moments: gradients set to
        ``None`` are allocated again in the middle of every backward pass, and those small
        blocks, alive until the next step, split the allocator's free space (with the lean
        window engine's kept inputs, ``TorchWindowBackend._kept``: ~40 MB less peak RSS for
        a window of 30 int4 layers; README, "Where the step's memory went")."""
        for p in self.params:
            if p.grad is None:
                p.grad = p.detach().new_zeros(p.shape)
            else:
                p.grad.zero_()

    def step(self) -> None:
        import torch

        self.steps += 1
        (b1, b2), lr = self.betas, self.lr
        first, second = 1 - b1**self.steps, math.sqrt(1 - b2**self.steps)
        with torch.no_grad():
            for p, (m, v) in zip(self.params, self.moments, strict=True):
                if p.grad is None:
                    continue
                p.mul_(1 - lr * self.weight_decay)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v.sqrt() / second).add_(self.eps), value=-lr / first)


def tune_backprop(
    backend: TrainableBackend,
    train: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
    params: str = "all",
    seconds: float | None = None,
    loss_of: Callable[[np.ndarray], Any] | None = None,
) -> dict:
    """``steps`` AdamW steps on batches drawn from ``train`` windows (fewer if ``seconds`` of
    wall-clock run out first); returns metrics. ``params="lora_b"`` keeps A at the fleet's
    shared init, so the adapters of such devices mix exactly (``edge_sdk.tuners.mix``).
    ``loss_of(rows)`` is a batch's loss tensor (default: the engine's, on ``train[rows]``)."""
    rng = np.random.default_rng(seed)
    optimizer = AdamW(backend.trainable(params), lr=lr)
    backend.model.train()
    losses: list[float] = []
    start = time.monotonic()
    try:
        for step in range(steps):
            if seconds is not None and time.monotonic() - start >= seconds:
                break
            rows = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
            loss = loss_of(rows) if loss_of is not None else backend.loss_tensor(train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        backend.model.eval()
    return {
        "steps": len(losses),
        "train_loss": float(np.mean(losses[-5:])) if losses else float("nan"),
        "seconds": time.monotonic() - start,
    }


class BackpropTuner(LocalTuner):
    """AdamW on the LoRA weights through a trainable engine; uploads the dense delta."""

    name = "backprop"

    def tune(
        self,
        backend: Backend,
        data: ClientData,
        start: Tensors,
        job: Job,
        progress: Progress | None = None,
    ) -> Tuned:
        if not backend.capabilities.backprop:
            raise ConfigError(
                f"backprop tuning needs a trainable engine (torch); {type(backend).__name__} "
                'runs forward only: use tuner = "zo" or "mix"'
            )
        t = self.config
        backend.set_adapter(start)
        metrics = tune_backprop(
            cast("TrainableBackend", backend),
            data.train,
            t.steps,
            t.lr,
            t.batch_size,
            job.seed(t.seed),
            progress,
            params=t.backprop_params,
        )
        local = backend.get_adapter()
        return Tuned(local, metrics, delta={k: local[k] - start[k] for k in local})
