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

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_sdk import codec
from edge_sdk.adapters.lora import LoraSpec, init_lora
from edge_sdk.adapters.lora.flat import FlatLayout
from edge_sdk.errors import ConfigError, PayloadError
from edge_sdk.manifest import BaseManifest
from edge_sdk.tuners.zo import ZOConfig, zo_tune

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
BASIS_PART = "lora_b"  # what a basis spans; A is the fleet's shared init
MAX_COEF = 100.0  # larger coefficients are refused as garbage
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Basis:
    """K adapters (their B part, A being the shared init) the fleet offers for mixing."""

    version: int
    vectors: np.ndarray  # [K, n] float32: the BASIS_PART entries of each adapter, layout order
    spec: LoraSpec
    base_sha256: str
    prior: np.ndarray | None = None  # [K]: the coefficients devices start from (mean usage)

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    def check(self, spec: LoraSpec, base: BaseManifest) -> None:
        """Refuse a basis built for another base model or adapter layout, naming which."""
        if self.base_sha256 != base.sha256:
            raise ConfigError(
                f"basis v{self.version} is for base {self.base_sha256[:12]}, this device runs "
                f"{base.name} ({base.short_hash})"
            )
        if self.spec != spec:
            raise ConfigError(f"basis v{self.version} holds {self.spec} adapters, not {spec}")
        size = FlatLayout(spec, base).indices(BASIS_PART).size
        if self.vectors.ndim != 2 or self.vectors.shape[1] != size or self.k < 1:
            raise PayloadError(
                f"basis v{self.version} is {self.vectors.shape}, expected [K >= 1, {size}]"
            )
        if self.prior is not None and self.prior.shape != (self.k,):
            raise PayloadError(f"basis prior has shape {self.prior.shape}, expected ({self.k},)")

    def encode(self, round_: int = 0, encoding: str = "q8") -> bytes:
        """The basis as an envelope (kind "basis"); q8 keeps K = 8 near 1.5 MB."""
        header = codec.Header(
            kind="basis",
            sender="server",
            round=round_,
            base_sha256=self.base_sha256,
            adapter=self.spec.to_dict(),
            encoding=encoding,
            version=self.version,
            metrics={
                "part": BASIS_PART,
                "prior": None if self.prior is None else [float(p) for p in self.prior],
            },
        )
        return codec.encode(header, {"basis": self.vectors})

    @classmethod
    def decode(cls, payload: bytes) -> Basis:
        """Parse a basis envelope; anything malformed is a ``PayloadError`` saying what."""
        header, tensors = codec.decode(payload)
        if header.kind != "basis" or set(tensors) != {"basis"}:
            raise PayloadError(f"expected a basis envelope, got kind {header.kind!r}")
        if header.metrics.get("part") != BASIS_PART:
            raise PayloadError(f"basis spans {header.metrics.get('part')!r}, not {BASIS_PART!r}")
        prior = header.metrics.get("prior")
        try:
            prior_arr = None if prior is None else np.asarray(prior, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise PayloadError(f"basis prior is not a list of numbers: {err}") from err
        return cls(
            header.version,
            tensors["basis"],
            LoraSpec.from_dict(header.adapter),
            header.base_sha256,
            prior_arr,
        )

    def start(self, groups: int) -> np.ndarray:
        """Initial coefficients [K, G]: the prior, or the plain average of the basis."""
        prior = self.prior if self.prior is not None else np.full(self.k, 1.0 / self.k)
        return np.repeat(np.asarray(prior, np.float32)[:, None], groups, axis=1)


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
        if not np.all(np.isfinite(coef)) or np.abs(coef).max() > MAX_COEF:
            raise PayloadError(f"coefficients must be finite and within ±{MAX_COEF}")
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

    def __post_init__(self) -> None:
        if self.steps < 0 or self.eval_every < 1 or self.patience < 1:
            raise ConfigError("mix steps >= 0, eval_every >= 1 and patience >= 1 are required")
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
    done, stale = 0, 0
    while done < config.steps and stale < config.patience:
        chunk = min(config.eval_every, config.steps - done)

        def chunk_loss(theta: np.ndarray, step: int, offset: int = done) -> float:
            return loss(theta.reshape(shape), offset + step)

        zo_tune(chunk_loss, coef, slice(None), chunk, zo, rng)
        done += chunk
        value = validate(coef.reshape(shape))
        curve.append((done, value, time.monotonic() - began))
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


def engine_loss(backend, mixer: Mixer) -> Callable[[np.ndarray, np.ndarray], float]:
    """``(windows, coef) -> loss`` through the engine: llama.cpp loads the K x G pieces once and
    takes the coefficients as adapter scales; an engine with the adapter as an input (ONNX
    Runtime, torch) takes the mixed vector."""
    if hasattr(backend, "load_pieces"):
        backend.load_pieces(mixer.pieces())

        def by_scales(windows: np.ndarray, coef: np.ndarray) -> float:
            backend.set_mix(mixer.check_coef(coef).reshape(-1))
            return float(backend.loss(windows))

        return by_scales

    def by_vector(windows: np.ndarray, coef: np.ndarray) -> float:
        return float(backend.loss_flat(windows, mixer.flat(coef)))

    return by_vector


def split_validation(train: np.ndarray, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The last ``n`` training windows (at most a fifth) become validation for early stopping;
    held-out text stays untouched for reporting."""
    n = min(n, len(train) // 5)
    if n < 1:
        raise ConfigError(f"{len(train)} training windows are too few to keep any for validation")
    return train[:-n], train[-n:]


def mixture_envelope(
    device: str, basis: Basis, coef: np.ndarray, num_examples: int, metrics: dict
) -> bytes:
    """What a device uploads after a search: its coefficients (K x G floats) and a few numbers,
    under 1 KB for K = 8."""
    header = codec.Header(
        kind="mixture",
        sender=device,
        round=0,
        base_sha256=basis.base_sha256,
        adapter=basis.spec.to_dict(),
        encoding="f32",
        num_examples=num_examples,
        version=basis.version,
        metrics=metrics,
    )
    return codec.encode(header, {"coef": np.asarray(coef, dtype=np.float32)})


def read_prior(payload: bytes) -> tuple[int, np.ndarray]:
    """The server's prior for a basis (``adapter/basis/prior``): its version and the K
    coefficients devices start from. Anything malformed is a ``PayloadError``."""
    try:
        body = json.loads(payload)
        version, prior = int(body["version"]), np.asarray(body["prior"], dtype=np.float32)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise PayloadError(f"basis prior is not {{version, prior}} JSON: {err}") from err
    if prior.ndim != 1 or not np.all(np.isfinite(prior)) or np.abs(prior).max(initial=0) > MAX_COEF:
        raise PayloadError(f"basis prior must be K finite coefficients within ±{MAX_COEF}")
    return version, prior
