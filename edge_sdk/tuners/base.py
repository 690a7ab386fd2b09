"""One interface for every way a device tunes its adapter on local text.

A :class:`LocalTuner` starts from an adapter, tunes it inside the engine and returns a
:class:`Tuned`: the adapter the engine now runs and what goes upstream (a dense delta, a seed run
or mixing coefficients). The client's round loop and personalization session do not care which
tuner they drive.
"""

from __future__ import annotations

import logging
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
    from fleetune.edge_sdk.backends import Backend
    from fleetune.edge_sdk.config import TuningConfig
    from fleetune.edge_sdk.data import ClientData
    from fleetune.edge_sdk.protocol import Basis, SeedPool, SeedRun
    from fleetune.edge_sdk.tuners.window import PrefixCache

log = logging.getLogger(__name__)
Tensors = dict[str, np.ndarray]
Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class Job:
    """What one tuning run is for: the device, the round, and what the server offered."""

    device: str
    round: int = 0
    pool: SeedPool | None = None  # zeroth-order: the round's seed pool
    basis: Basis | None = None  # mixture: the fleet's basis

    def seed(self, base_seed: int, salt: str = "") -> int:
        """A batch-sampling seed that differs per device and round but repeats across runs."""
        return zlib.crc32(f"{base_seed}/{self.device}/{salt or self.round}".encode())


@dataclass
class Tuned:
    """A tuning run's result; the engine holds ``adapter`` afterwards."""

    adapter: Tensors
    metrics: dict = field(default_factory=dict)
    delta: Tensors | None = None  # backprop: adapter - start
    seeds: SeedRun | None = None  # zeroth-order: the run, replayable bit-for-bit
    coef: np.ndarray | None = None  # mixture: coefficients [K, G]


class LocalTuner(ABC):
    """Backprop, zeroth-order and mixture tuners implement :meth:`tune`."""

    name: ClassVar[str]

    def __init__(self, config: TuningConfig, layout: FlatLayout) -> None:
        self.config, self.layout = config, layout
        self._prefix: tuple[np.ndarray, int, PrefixCache] | None = None  # train, prefix version
        # a device under a memory budget: RAM its prefix cache may take beyond the step's
        # estimate, and where a larger one goes (``EdgeClient`` sets them)
        self.cache_ram_mb = math.inf
        self.cache_dir: Path | None = None

    def prefix_cache(self, backend: Backend, train: np.ndarray) -> PrefixCache | None:
        """The states entering the adapter's layer window for every training window, computed
        once per dataset and kept across rounds (the layers below never change, unless the
        fleet's adapter reaches below the window: ``prefix_version``), in RAM or, when larger
        than ``cache_ram_mb``, in a file in ``cache_dir``; ``None`` for a full-depth adapter or
        an engine without windows (it runs whole forwards)."""
        if not self.layout.spec.window or not backend.capabilities.window:
            return None
        version = getattr(backend, "prefix_version", 0)
        if self._prefix is None or self._prefix[0] is not train or self._prefix[1] != version:
            from fleetune.edge_sdk.tuners.window import build_cache, cache_mb

            if self._prefix is not None:  # the old cache leaves before the new one is built
                self._prefix[2].close()
                self._prefix = None
            size = cache_mb(backend, *train.shape)  # type: ignore[arg-type]
            path = None  # in RAM, unless a budget leaves it less than it needs
            if size > self.cache_ram_mb and self.cache_dir is not None:
                path = self.cache_dir / "prefix-states.f32"
            cache = build_cache(backend, train, path)  # type: ignore[arg-type]
            log.info("prefix cache of %d windows: %.1f MB in %s", len(train), size, cache.where)
            self._prefix = (train, version, cache)
        return self._prefix[2]

    def close(self) -> None:
        """Drop the prefix cache (a file on disk goes)."""
        if self._prefix is not None:
            self._prefix[2].close()
            self._prefix = None

    @abstractmethod
    def tune(
        self,
        backend: Backend,
        data: ClientData,
        start: Tensors,
        job: Job,
        progress: Progress | None = None,
    ) -> Tuned:
        """Tune from ``start`` on ``data.train``; leave the result in ``backend``."""

    def batches(self, train: np.ndarray, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``steps`` batches of distinct training windows."""
        return [train[pick] for pick in self.picks(len(train), steps, rng)]

    def picks(self, rows: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The rows of :meth:`batches`' batches."""
        size = min(self.config.batch_size, rows)
        return [rng.choice(rows, size=size, replace=False) for _ in range(steps)]


def make_tuner(config: TuningConfig, layout: FlatLayout) -> LocalTuner:
    """The tuner ``config.tuner`` names."""
    from fleetune.edge_sdk.tuners.backprop import BackpropTuner
    from fleetune.edge_sdk.tuners.mix import MixTuner
    from fleetune.edge_sdk.tuners.window import WindowTuner
    from fleetune.edge_sdk.tuners.zo import ZOTuner

    tuners: dict[str, type[LocalTuner]] = {
        t.name: t for t in (BackpropTuner, ZOTuner, MixTuner, WindowTuner)
    }
    return tuners[config.tuner](config, layout)
