"""Error feedback for lossy uplinks: what an encoding dropped from one update (the entries top-k
left out, the rounding of q4) is added to the device's next update instead of being lost (Seide
et al., "1-bit SGD", Interspeech 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML
2019). The residual lives in the device's state folder, so a reboot loses none of it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from fleetune.edge_sdk.codec.compress import Tensors
from fleetune.edge_sdk.store import atomic_write

log = logging.getLogger(__name__)


class ErrorFeedback:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def residual(self) -> Tensors:
        """What earlier updates dropped; empty if none (or if the file is unreadable)."""
        if not self.path.exists():
            return {}
        try:
            return load_file(self.path)
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("error feedback: %s is unreadable (%s); starting afresh", self.path, err)
            return {}

    def add(self, delta: Tensors) -> Tensors:
        """``delta`` plus the residual, entry by entry (a residual of another shape, left by an
        adapter of another layout, is dropped)."""
        kept = self.residual()
        out = {}
        for name, value in delta.items():
            extra = kept.get(name)
            out[name] = value + extra if extra is not None and extra.shape == value.shape else value
        return out

    def keep(self, intended: Tensors, sent: Tensors) -> None:
        """Remember what the message did not carry: ``intended - sent`` for every tensor it sent
        (a tensor it never sends, such as B under shared-A, leaves no residual)."""
        residual = {
            name: np.ascontiguousarray(intended[name] - value, dtype=np.float32)
            for name, value in sent.items()
            if name in intended
        }
        atomic_write(self.path, save(residual))
