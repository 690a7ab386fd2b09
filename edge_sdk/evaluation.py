"""What a device measures: held-out perplexity, and the report of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fleetune.edge_sdk.backends import Backend


@dataclass
class DeviceReport:
    """What a device measured over a run; JSON-friendly."""

    device: str
    client: str
    ppl_base: float = math.nan
    ppl_local: float = math.nan  # after local tuning in the last round
    ppl_final: float = math.nan  # under the final global (or personal) adapter
    ppl_served: float = math.nan  # under the adapter the device serves (edge_sdk/canary.py)
    served: str = ""  # which one that is: base | global | local | cluster
    bytes_up: int = 0
    bytes_down: int = 0
    history: list[dict] = field(default_factory=list)  # per round: ppl_global, ppl_local


def perplexity(backend: Backend, windows: np.ndarray, batch_size: int) -> float:
    """Perplexity of the engine's current adapter on ``windows`` (token-weighted mean loss)."""
    losses = [
        backend.loss(windows[i : i + batch_size]) * len(windows[i : i + batch_size])
        for i in range(0, len(windows), batch_size)
    ]
    return float(math.exp(sum(losses) / len(windows)))
