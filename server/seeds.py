"""Zeroth-order rounds on the server: each round's seed pool (FedKSeed) and the replay of merged
seeds into a dense delta, each seed's direction drawn once whatever the fleet size."""

from __future__ import annotations

import zlib

import numpy as np

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.protocol import SeedPool
from fleetune.edge_sdk.tuners.zo import replay

Tensors = dict[str, np.ndarray]


class SeedPools:
    def __init__(self, fleet: str, layout: FlatLayout, pool_size: int, params: str) -> None:
        self.fleet, self.layout, self.pool_size, self.params = fleet, layout, pool_size, params
        self._windows: dict[LoraSpec, FlatLayout] = {layout.spec: layout}

    def pool(self, round_: int) -> SeedPool:
        """The round's pool: devices draw their perturbations from it."""
        seed = zlib.crc32(f"{self.fleet}/{self.layout.base.sha256}/{round_}".encode())
        return SeedPool(seed, self.pool_size, self.params)

    def replay(self, seeds: dict[int, float], round_: int, spec: LoraSpec | None = None) -> Tensors:
        """The dense delta of merged seeds of ``round_``, in the fleet's layout or in that of
        the window ``spec`` a window device drew them in (its layers only)."""
        layout = self._windows.get(spec or self.layout.spec)
        if layout is None:
            assert spec is not None  # the fleet's own layout is always there
            layout = self._windows[spec] = FlatLayout(spec, self.layout.base)
        tuned = layout.indices(self.params)
        delta = np.zeros(layout.size, dtype=np.float32)
        delta[tuned] = replay(list(seeds.items()), self.pool(round_).pool_seed, tuned.size)
        return layout.unflatten(delta)
