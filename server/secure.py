"""Secure aggregation at the server (``[server] secagg = true``; the masks are in
``edge_sdk/secagg.py``). Devices announce an X25519 masking key on their status; a round's
cohort is the online devices with a key (at least two), named with their keys in the round's
announcement. Each member uploads its update in fixed point plus pairwise masks, so the server
sees no single update. After the round the masked uploads are summed; if some members masked but
never uploaded, the survivors are asked (``secagg/unmask``) for their pair seeds with them
(``secagg/reveal/{device}``) and those masks are removed. The round's delta is the survivors'
mean with equal weights (an example count cannot weigh what the server never sees).
"""

from __future__ import annotations

import logging

import numpy as np

from fleetune.edge_sdk.errors import AggregationError, PayloadError
from fleetune.edge_sdk.protocol import MAX_COHORT, Reveal, SecAggRound
from fleetune.edge_sdk.secagg import unmask_sum

log = logging.getLogger(__name__)


class SecureRounds:
    def __init__(self, bound: float, scale: float) -> None:
        self.bound, self.scale = bound, scale
        self.keys: dict[str, str] = {}  # device -> masking key (hex), from its status
        self.cohorts: dict[int, SecAggRound] = {}

    def note_key(self, device: str, key: str) -> None:
        if key:
            self.keys[device] = key

    def open(self, round_: int, online: set[str]) -> SecAggRound | None:
        """The round's cohort: online devices with a masking key (``None`` below two)."""
        members = {d: k for d, k in sorted(self.keys.items()) if d in online}
        members = dict(list(members.items())[:MAX_COHORT])
        if len(members) < 2:
            return None
        self.cohorts[round_] = cohort = SecAggRound(members, self.bound, self.scale)
        return cohort

    def check(self, round_: int, device: str, masked: np.ndarray | None) -> None:
        """Only masked uploads of the round's cohort count; a round without a cohort (fewer
        than two devices with keys) takes nothing, so no update is ever seen alone."""
        cohort = self.cohorts.get(round_)
        if cohort is None:
            raise PayloadError(f"round {round_} has no secure cohort: nothing is accepted", "round")
        if masked is None:
            raise PayloadError(f"round {round_} aggregates securely: upload masked", "round")
        if device not in cohort.cohort:
            raise PayloadError(f"{device} is not in round {round_}'s secure cohort", "identity")

    def dropped(self, round_: int, senders: list[str]) -> list[str]:
        return sorted(set(self.cohorts[round_].cohort) - set(senders))

    def mean(
        self, round_: int, masked: dict[str, np.ndarray], reveals: dict[str, Reveal]
    ) -> np.ndarray:
        """The survivors' mean update (flat float32), or ``AggregationError`` when a survivor
        did not reveal what unmasking needs."""
        dropped = self.dropped(round_, list(masked))
        revealed = []
        for survivor in masked if dropped else ():
            seeds = reveals[survivor].seeds if survivor in reveals else {}
            missing = [d for d in dropped if d not in seeds]
            if missing:
                raise AggregationError(
                    f"round {round_}: {survivor} did not reveal its pair seeds with {missing}; "
                    "the masked sum cannot be opened"
                )
            revealed += [(survivor, d, bytes.fromhex(seeds[d])) for d in dropped]
        total = unmask_sum(masked, revealed, self.scale)
        log.info(
            "round %d: securely aggregated %d updates (%d dropped after masking)",
            round_,
            len(masked),
            len(dropped),
        )
        return (total / len(masked)).astype(np.float32)
