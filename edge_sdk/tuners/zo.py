"""Forward-only tuning: SPSA / MeZO (Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes", NeurIPS 2023) with seeds from a finite pool the server announces (FedKSeed: Qin et
al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication Cost
under 18 Kilobytes", ICML 2024).

One step, for a seed ``s`` drawn from the pool::

    z = g shifted circularly by s·STRIDE, g = N(0, 1) from PCG64(pool_seed) over the tuned
        entries in the manifest's order (one vector per pool: see "Directions" below)
    g = (L(θ + εz) − L(θ − εz)) / 2ε            # the projected gradient: two forward passes
    θ ← θ − lr·g·z

The step is fully described by ``(s, −lr·g)``; a run is the list of those pairs, so the device
uploads a few bytes per step and the server replays the run exactly: ``Δ = Σ c·z(s)``, summing
coefficients per seed first so its cost does not grow with the number of devices.

With ``perturbations = k > 1`` a step is NOT MeZO's n-SPSA average (all k directions evaluated at
the same θ, then one update with the mean of the k estimates). It is k sequential sub-steps on the
same batch: direction ``z_i`` is evaluated at θ_i, which already includes the sub-steps
``j < i`` of this step, and applied at once with coefficient ``c_i = −(lr/k)·g_i(θ_i)``
(rounded to float32)::

    θ_0 = θ;  θ_{i+1} = θ_i + c_i·z_i  (i = 0..k−1);  θ ← θ_k

For small ``lr`` the two agree to first order, but they are different algorithms. Replay only sums
the uploaded ``(s_i, c_i)`` pairs, so it is exact either way; the rule is kept as is so that runs
(and their recorded coefficients) stay reproducible.

Directions (z version 2): every seed's direction is the pool's one Gaussian vector ``g`` rotated
by ``s·STRIDE`` entries. Each direction is exactly N(0, I), and two seeds' directions are
uncorrelated (E[z_s·z_t] = 0 for s ≠ t) as independent draws would be. What it buys is the
replay: ``Σ c_s·z_s`` is a circular cross-correlation of ``g`` with the coefficients placed at
their shifts, one FFT whatever the number of seeds (4,096 seeds of 184k entries: ~10 ms instead
of ~9 s drawing each seed's vector, version 1), and a step's direction is a copy, not a draw.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.protocol import Z_VERSION, SeedRun
from fleetune.edge_sdk.tuners.base import Job, LocalTuner, Progress, Tensors, Tuned

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import Backend
    from fleetune.edge_sdk.data import ClientData

log = logging.getLogger(__name__)
__all__ = ["Z_VERSION", "ZOConfig", "ZOTuner", "apply_run", "perturbation", "replay", "zo_tune"]
SCHEDULES = ("constant", "linear", "cosine")


STRIDE = 7919  # a prime: seeds below the tuned size get distinct rotations


@functools.lru_cache(maxsize=4)
def _pool_vector(pool_seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pool's Gaussian vector ``g`` (read-only) and its real FFT (the replay's half)."""
    g = np.random.Generator(np.random.PCG64(pool_seed)).standard_normal(size, dtype=np.float32)
    g.flags.writeable = False
    return g, np.fft.rfft(g.astype(np.float64))


def _shift(index: int, size: int) -> int:
    return (index * STRIDE) % size


def perturbation(pool_seed: int, index: int, size: int) -> np.ndarray:
    """The direction of seed ``index`` of the pool: float32 N(0, 1) of length ``size``,
    ``z[i] = g[(i + index·STRIDE) mod size]``."""
    g, _ = _pool_vector(pool_seed, size)
    return np.roll(g, -_shift(index, size))


@dataclass(frozen=True)
class ZOConfig:
    lr: float = 1e-2  # B-only LoRA: best of a 1e-3..3e-2 sweep (shared/research)
    eps: float = 1e-3  # perturbation scale
    perturbations: int = 1  # directions per step, applied in turn with lr / k (see module doc)
    schedule: str = "constant"  # lr schedule: constant | linear | cosine (decay to 0)
    eps_schedule: str = "constant"  # eps schedule, same choices (decays to eps / 10)
    pool_seed: int = 0  # the server's pool: seeds are (pool_seed, index), index < pool_size
    pool_size: int = 4096

    def __post_init__(self) -> None:
        if not (0 < self.lr <= 100 and 0 < self.eps < 1):
            raise ConfigError("zo lr must be in (0, 100] and eps in (0, 1)")
        if self.perturbations < 1 or self.pool_size < 1:
            raise ConfigError("zo perturbations and pool_size must be >= 1")
        for name in (self.schedule, self.eps_schedule):
            if name not in SCHEDULES:
                raise ConfigError(f"zo schedule {name!r} is not one of {SCHEDULES}")

    def lr_at(self, step: int, total: int) -> float:
        return self.lr * _decay(self.schedule, step, total, floor=0.0)

    def eps_at(self, step: int, total: int) -> float:
        return self.eps * _decay(self.eps_schedule, step, total, floor=0.1)


def _decay(schedule: str, step: int, total: int, floor: float) -> float:
    """Multiplier at ``step`` of ``total``: 1 throughout, or decaying from 1 to ``floor``."""
    frac = step / max(total, 1)
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def zo_tune(
    loss: Callable[[np.ndarray, int], float],
    theta: np.ndarray,
    tuned: slice | np.ndarray,
    steps: int,
    config: ZOConfig,
    rng: np.random.Generator,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[list[tuple[int, float]], dict]:
    """Run ``steps`` SPSA steps on ``theta`` in place (only the ``tuned`` entries move).

    ``loss(theta, step)`` evaluates the caller's batch for ``step``. Returns the
    ``(seed index, coefficient)`` pairs that replay the run and a few metrics. With
    ``config.perturbations = k`` each step is k sequential sub-steps of ``lr / k`` (each direction
    evaluated at the already-updated θ, see the module doc), one pair per sub-step.
    """
    view = theta[tuned].copy()  # a slice would alias theta
    size = view.size
    pairs: list[tuple[int, float]] = []
    losses = []
    start = time.monotonic()
    for step in range(steps):
        lr, eps = config.lr_at(step, steps), config.eps_at(step, steps)
        for _ in range(config.perturbations):
            index = int(rng.integers(config.pool_size))
            z = perturbation(config.pool_seed, index, size)
            theta[tuned] = view + eps * z
            plus = loss(theta, step)
            theta[tuned] = view - eps * z
            minus = loss(theta, step)
            grad = (plus - minus) / (2.0 * eps)
            coef = -lr * grad / config.perturbations
            view = view + np.float32(coef) * z
            theta[tuned] = view
            pairs.append((index, float(np.float32(coef))))
            losses.append(0.5 * (plus + minus))
        if progress is not None:
            progress(step + 1, losses[-1])
    return pairs, {
        "steps": steps,
        "train_loss": float(np.mean(losses[-10:])) if losses else 0.0,
        "seconds": time.monotonic() - start,
        "forward_passes": 2 * len(pairs),
    }


def replay(pairs: list[tuple[int, float]], pool_seed: int, size: int) -> np.ndarray:
    """The delta that ``(seed index, coefficient)`` pairs stand for, ``Σ c·z(s)``: the
    coefficients placed at their seeds' shifts ``h``, then ``Δ[i] = Σ_k h[k]·g[i + k]``, a
    circular cross-correlation of ``g`` and ``h`` (one FFT each way, float64)."""
    delta = np.zeros(size, dtype=np.float32)
    if not pairs or size == 0:
        return delta
    _, spectrum = _pool_vector(pool_seed, size)
    h = np.zeros(size, dtype=np.float64)
    for index, coef in pairs:
        h[_shift(index, size)] += coef
    delta[:] = np.fft.irfft(spectrum * np.conj(np.fft.rfft(h)), n=size)
    return delta


class ZOTuner(LocalTuner):
    """Forward-only steps with seeds from the round's pool; uploads the seed run, and the engine
    ends up holding exactly the adapter the server will rebuild from it."""

    name = "zo"

    def tune(
        self,
        backend: Backend,
        data: ClientData,
        start: Tensors,
        job: Job,
        progress: Progress | None = None,
    ) -> Tuned:
        pool = job.pool
        if pool is None:
            raise PayloadError("the server announced no seed pool for zeroth-order tuning")
        if pool.z_version != Z_VERSION:
            raise ConfigError(
                f"the server draws perturbations by z version {pool.z_version}, this device by "
                f"{Z_VERSION}: update fleetune on one side"
            )
        t = self.config
        zo = t.zo(pool_seed=pool.pool_seed, pool_size=pool.pool_size)
        rng = np.random.default_rng(job.seed(t.seed))
        picks = self.picks(len(data.train), t.steps, rng)
        theta = self.layout.flatten(start)
        tuned = self.layout.indices(pool.params)
        cache = self.prefix_cache(backend, data.train)
        if cache is not None:  # forwards from the states entering the layer window

            def loss(th: np.ndarray, step: int) -> float:
                rows = np.sort(picks[step])
                return backend.window_loss_flat(cache.hidden[rows], cache.ids[rows], th)  # type: ignore[attr-defined]

        else:

            def loss(th: np.ndarray, step: int) -> float:
                return backend.loss_flat(data.train[picks[step]], th)

        pairs, metrics = zo_tune(
            loss,
            theta,
            tuned,
            t.steps,
            zo,
            rng,
            progress,
        )
        if cache is not None:
            metrics.update(cache.metrics())
        run = SeedRun.from_pairs(pairs, pool.pool_seed, pool.params)
        adapter = self.layout.unflatten(apply_run(self.layout.flatten(start), tuned, run))
        backend.set_adapter(adapter)
        return Tuned(adapter, metrics, seeds=run)


def apply_run(theta: np.ndarray, tuned: np.ndarray, run: SeedRun) -> np.ndarray:
    """``theta`` with the delta of ``run`` added on its ``tuned`` entries (in place)."""
    theta[tuned] += replay(run.pairs(), run.pool_seed, tuned.size)
    return theta
