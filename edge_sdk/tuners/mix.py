"""Few-step personalization: a zeroth-order search over the mixing coefficients of K fleet adapters
(LoraHub: Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", COLM 2024), run inside the inference engine.

Plain MeZO moves 184k LoRA-B entries and its noise grows with that dimension. Here the device
moves K coefficients (or K x G: one per basis adapter and layer group) of a basis the server
builds from what the fleet learned::

    B(c) = sum_k sum_g c[k, g] * B_k restricted to the layers of group g

Every basis adapter shares the fleet's A (``init_lora``: the same seed everywhere; basis devices
tune B only), so the mix in parameter space is exactly the mix in weight space:
``sum c_k B_k A = (sum c_k B_k) A``. That is why ONNX Runtime (the mixed vector as the adapter
input) and llama.cpp (the K adapters loaded once, the coefficients as their scales) compute the
same model.

The search is SPSA from :mod:`edge_sdk.tuners.zo` on the coefficient vector, in chunks with an
evaluation on validation windows after each, keeping the best coefficients (early stopping). Its
objective is the loss on one fixed batch of training windows, as LoraHub optimizes a fixed
few-shot loss: in 8 dimensions a deterministic objective lets SPSA converge in tens of steps,
where fresh batches every step left it wandering (measured: README, "Mixture personalization").
"""

from __future__ import annotations

import logging
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.data import split_validation
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.protocol import BASIS_PART, MAX_MIX_COEF, Basis, SeedRun
from fleetune.edge_sdk.tuners.base import Job, LocalTuner, Progress, Tensors, Tuned
from fleetune.edge_sdk.tuners.zo import ZOConfig, apply_run, zo_tune

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import Backend, ScaledBackend
    from fleetune.edge_sdk.data import ClientData

log = logging.getLogger(__name__)
__all__ = ["BASIS_PART", "Basis", "MixConfig", "MixTuner", "Mixer", "tune_mix"]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class Mixer:
    """Maps coefficients [K, G] to an adapter: as one flat vector (any engine taking the adapter
    as an input) or as K x G adapter pieces with the coefficients as scales (llama.cpp)."""

    def __init__(self, basis: Basis, base: BaseManifest, groups: int = 1) -> None:
        basis.check(basis.spec, base)
        self.basis, self.base, self.spec = basis, base, basis.spec
        if not 1 <= groups <= base.num_layers:
            raise ConfigError(f"mix groups must be in 1..{base.num_layers}, got {groups}")
        self.groups = groups
        self.layout = FlatLayout(self.spec, base)
        self.index = self.layout.indices(BASIS_PART)
        self.anchor = self.layout.flatten(init_lora(self.spec, base))
        # the tuned entries are in layer order, so each layer group is one contiguous range
        layer_of = np.empty(self.layout.size, dtype=np.int32)
        for name, shape, offset in self.layout.entries:
            layer_of[offset : offset + math.prod(shape)] = int(_LAYER.search(name).group(1))  # type: ignore[union-attr]
        group_of = layer_of[self.index] * groups // base.num_layers
        self.bounds = np.searchsorted(group_of, np.arange(groups + 1))
        # layer l is in group l * G // L (as above), so group g starts at ceil(g * L / G)
        first = [-(-g * base.num_layers // groups) for g in range(groups + 1)]
        self.layers = [range(first[g], first[g + 1]) for g in range(groups)]

    def check_coef(self, coef: np.ndarray) -> np.ndarray:
        coef = np.asarray(coef, dtype=np.float32)
        if coef.size != self.basis.k * self.groups:
            raise PayloadError(
                f"coefficients have shape {coef.shape}, expected ({self.basis.k}, {self.groups})"
            )
        coef = coef.reshape(self.basis.k, self.groups)
        if not np.all(np.isfinite(coef)) or np.abs(coef).max() > MAX_MIX_COEF:
            raise PayloadError(f"coefficients must be finite and within ±{MAX_MIX_COEF}")
        return coef

    def mixed_part(self, coef: np.ndarray) -> np.ndarray:
        """sum_k c[k, g] * B_k over each group's range: the tuned entries of the mix."""
        coef = self.check_coef(coef)
        out = np.empty(self.index.size, dtype=np.float32)
        for g in range(self.groups):
            lo, hi = self.bounds[g], self.bounds[g + 1]
            out[lo:hi] = coef[:, g] @ self.basis.vectors[:, lo:hi]
        return out

    def flat(self, coef: np.ndarray) -> np.ndarray:
        """The mixed adapter as a flat vector (shared A, mixed B)."""
        theta = self.anchor.copy()
        theta[self.index] = self.mixed_part(coef)
        return theta

    def adapter(self, coef: np.ndarray) -> Tensors:
        return self.layout.unflatten(self.flat(coef))

    def pieces(self) -> list[tuple[Tensors, range]]:
        """Basis adapter k restricted to group g, for k, g in row-major order (coefficient
        ``c[k, g]`` scales piece ``k * G + g``): what llama.cpp loads once."""
        out = []
        for k in range(self.basis.k):
            one_hot = np.zeros((self.basis.k, self.groups), dtype=np.float32)
            one_hot[k, :] = 1.0
            full = self.adapter(one_hot)
            out += [(full, layers) for layers in self.layers]
        return out


@dataclass(frozen=True)
class MixConfig:
    steps: int = 50  # SPSA steps at most (each: two forward passes)
    lr: float = 0.3  # coefficient step size (0.1 too slow, 0.5 unstable: README)
    eps: float = 0.1  # coefficient perturbation
    groups: int = 1  # coefficients per basis adapter (layer groups)
    eval_every: int = 10  # validation after this many steps
    patience: int = 3  # stop after this many evaluations without improvement
    seconds: float | None = None  # wall-clock: no chunk starts unless one more fits in it

    def __post_init__(self) -> None:
        if self.steps < 0 or self.eval_every < 1 or self.patience < 1:
            raise ConfigError("mix steps >= 0, eval_every >= 1 and patience >= 1 are required")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"mix seconds must be > 0, got {self.seconds}")
        if not (0 < self.lr <= 100 and 0 < self.eps < 1):
            raise ConfigError("mix lr must be in (0, 100] and eps in (0, 1)")


def tune_mix(
    loss: Callable[[np.ndarray, int], float],
    validate: Callable[[np.ndarray], float],
    start: np.ndarray,
    config: MixConfig,
    rng: np.random.Generator,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """Search coefficients from ``start`` [K, G]: ``loss(coef, step)`` on the step's training
    batch, ``validate(coef)`` on validation windows. Returns the best coefficients seen and
    metrics, including the validation curve ``[(step, loss, seconds)]``."""
    shape = start.shape
    coef = np.asarray(start, dtype=np.float32).reshape(-1).copy()
    zo = ZOConfig(lr=config.lr, eps=config.eps, pool_seed=int(rng.integers(2**31)))
    began = time.monotonic()
    best_coef, best = coef.copy(), validate(coef.reshape(shape))
    curve = [(0, best, 0.0)]
    done, stale, last = 0, 0, 0.0
    while done < config.steps and stale < config.patience:
        if config.seconds is not None and time.monotonic() - began + last > config.seconds:
            break
        chunk_began = time.monotonic()
        chunk = min(config.eval_every, config.steps - done)

        def chunk_loss(theta: np.ndarray, step: int, offset: int = done) -> float:
            return loss(theta.reshape(shape), offset + step)

        zo_tune(chunk_loss, coef, slice(None), chunk, zo, rng)
        done += chunk
        value = validate(coef.reshape(shape))
        curve.append((done, value, time.monotonic() - began))
        last = time.monotonic() - chunk_began
        if value < best:
            best, best_coef, stale = value, coef.copy(), 0
        else:
            stale += 1
        if progress is not None:
            progress(done, value)
    return best_coef.reshape(shape), {
        "steps": done,
        "val_loss_start": curve[0][1],
        "val_loss": best,
        "seconds": time.monotonic() - began,
        "forward_passes": 2 * done,
        "curve": curve,
    }


def engine_loss(backend: Backend, mixer: Mixer) -> Callable[[np.ndarray, np.ndarray], float]:
    """``(windows, coef) -> loss`` through the engine: llama.cpp loads the K x G pieces once and
    takes the coefficients as adapter scales; an engine with the adapter as an input (ONNX
    Runtime, torch) takes the mixed vector."""
    if backend.capabilities.adapter_scales:
        scaled = cast("ScaledBackend", backend)
        scaled.load_pieces(mixer.pieces())

        def by_scales(windows: np.ndarray, coef: np.ndarray) -> float:
            scaled.set_mix(mixer.check_coef(coef).reshape(-1))
            return float(scaled.loss(windows))

        return by_scales

    def by_vector(windows: np.ndarray, coef: np.ndarray) -> float:
        return float(backend.loss_flat(windows, mixer.flat(coef)))

    return by_vector


def window_mean(
    loss: Callable[[np.ndarray, np.ndarray], float], windows: np.ndarray, coef: np.ndarray, bs: int
) -> float:
    """``loss`` over ``windows`` in batches of ``bs``, weighted by each batch's windows: the
    search's validation loss."""
    parts = [
        (loss(windows[i : i + bs], coef), len(windows[i : i + bs]))
        for i in range(0, len(windows), bs)
    ]
    return sum(v * n for v, n in parts) / len(windows)


class MixTuner(LocalTuner):
    """Searches mixing coefficients over the fleet's basis inside the engine, stopping early on
    validation windows split off the training text; optionally continues with plain B-only ZO
    steps from the mix, kept only if validation improves (their seeds ride in the upload)."""

    name = "mix"

    def tune(
        self,
        backend: Backend,
        data: ClientData,
        start: Tensors,
        job: Job,
        progress: Progress | None = None,
    ) -> Tuned:
        basis = job.basis
        if basis is None:
            raise ConfigError("mixture tuning needs the fleet's basis")
        t = self.config
        base = self.layout.base
        basis.check(self.layout.spec, base)
        mixer = Mixer(basis, base, groups=t.mix_groups)
        train, val = split_validation(data.train)
        loss = engine_loss(backend, mixer)
        rng = np.random.default_rng(job.seed(t.seed, "mix"))
        bs = t.batch_size
        fixed = train[rng.choice(len(train), size=min(bs, len(train)), replace=False)]

        coef, metrics = tune_mix(
            lambda c, step: loss(fixed, c),
            lambda c: window_mean(loss, val, c, bs),
            basis.start(t.mix_groups),
            t.mix(),
            rng,
            progress,
        )
        theta = mixer.flat(coef)
        run = None
        if t.mix_zo_steps:
            theta, run = self._warm_zo(backend, theta, train, val, job, metrics, rng)
        adapter = self.layout.unflatten(theta)
        backend.set_adapter(adapter)
        return Tuned(adapter, metrics, seeds=run, coef=coef)

    def _warm_zo(
        self,
        backend: Backend,
        start: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        job: Job,
        metrics: dict,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, SeedRun | None]:
        """Plain B-only ZO from the mixed adapter; kept only if validation improves."""
        t = self.config
        version = job.basis.version if job.basis is not None else 0
        zo = t.zo(pool_seed=zlib.crc32(f"{job.device}/mix/{version}".encode()))
        tuned = self.layout.indices(BASIS_PART)
        batches = self.batches(train, t.mix_zo_steps, rng)
        pairs, _ = zo_tune(
            lambda th, step: backend.loss_flat(batches[step], th),
            start.copy(),
            tuned,
            t.mix_zo_steps,
            zo,
            rng,
        )
        run = SeedRun.from_pairs(pairs, zo.pool_seed, BASIS_PART)
        theta = apply_run(start.copy(), tuned, run)
        after = backend.loss_flat(val, theta)
        log.info(
            "%s: %d ZO steps after the mixture: validation loss %.3f → %.3f",
            job.device,
            t.mix_zo_steps,
            metrics["val_loss"],
            after,
        )
        if after >= metrics["val_loss"]:
            return start, None
        metrics["val_loss"] = after
        return theta, run
