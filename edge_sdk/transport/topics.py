"""The MQTT topic scheme. Everything of a fleet lives under ``fleetune/{fleet}/``:

============================  ======  ========  =============================================
topic                         QoS     retained  payload
============================  ======  ========  =============================================
``round``                     1       yes       JSON round announcement (server → devices)
``adapter/global``            1       yes       envelope, kind "adapter" (server → devices)
``adapter/global/seeds``      1       yes       the same round as seeds (zeroth-order rounds)
``adapter/basis``             1       yes       envelope, kind "basis": K adapters to mix
``adapter/basis/prior``       1       yes       JSON ``{"version", "prior", "devices"}``: the
                                                 coefficients devices start from (a few bytes,
                                                 updated after each mixture)
``adapter/device/{device}``   1       yes       envelope, kind "adapter": one device's mixture
                                                 or cluster adapter
``adapter/cluster/{c}``       1       yes       envelope, kind "adapter": cluster c's adapter
                                                 (``[server] cluster_assign = "loss"``)
``update/{device}``           1       no        envelope, kind "update" (device → server)
``mixture/{device}``          1       no        envelope, kind "mixture": K x G coefficients
``status/{device}``           1       yes       JSON ``{"state": "online"|"offline"}``; the
                                                 "offline" one is the device's last will
``keys``                      1       yes       the fleet's signed list of trusted public keys
                                                 (key rotation, ``edge_sdk/signing.py``)
``secagg/unmask``             1       yes       JSON: a secure-aggregation round's dropped
                                                 devices (server → devices)
``secagg/reveal/{device}``    1       no        JSON: a survivor's pair seeds with them
============================  ======  ========  =============================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleetune.edge_sdk.errors import ConfigError

ROOT = "fleetune"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(kind: str, value: str) -> str:
    """Fleet and device ids become topic levels: no wildcards, separators or spaces."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{kind} id {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class Topics:
    fleet: str

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def round(self) -> str:
        return f"{self.prefix}/round"

    @property
    def global_adapter(self) -> str:
        return f"{self.prefix}/adapter/global"

    @property
    def global_seeds(self) -> str:
        return f"{self.prefix}/adapter/global/seeds"

    @property
    def keys(self) -> str:
        return f"{self.prefix}/keys"

    @property
    def basis(self) -> str:
        return f"{self.prefix}/adapter/basis"

    @property
    def basis_prior(self) -> str:
        return f"{self.prefix}/adapter/basis/prior"

    @property
    def secagg_unmask(self) -> str:
        return f"{self.prefix}/secagg/unmask"

    def reveal(self, device: str) -> str:
        return f"{self.prefix}/secagg/reveal/{check_id('device', device)}"

    @property
    def all_reveals(self) -> str:
        return f"{self.prefix}/secagg/reveal/+"

    def personal(self, device: str) -> str:
        return f"{self.prefix}/adapter/device/{check_id('device', device)}"

    def cluster(self, c: int) -> str:
        return f"{self.prefix}/adapter/cluster/{int(c)}"

    @property
    def all_clusters(self) -> str:
        return f"{self.prefix}/adapter/cluster/+"

    def is_cluster(self, topic: str) -> bool:
        return topic.rpartition("/")[0] == f"{self.prefix}/adapter/cluster"

    def mixture(self, device: str) -> str:
        return f"{self.prefix}/mixture/{check_id('device', device)}"

    @property
    def all_mixtures(self) -> str:
        return f"{self.prefix}/mixture/+"

    def update(self, device: str) -> str:
        return f"{self.prefix}/update/{check_id('device', device)}"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/update/+"

    def status(self, device: str) -> str:
        return f"{self.prefix}/status/{check_id('device', device)}"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def partial(self, worker: str) -> str:
        """An aggregator worker's partial sum for the coordinator (server side only)."""
        return f"{self.prefix}/server/partial/{check_id('worker', worker)}"

    @property
    def all_partials(self) -> str:
        return f"{self.prefix}/server/partial/+"

    @property
    def flush(self) -> str:
        """The coordinator asks the workers for a round's partial sums (server side only)."""
        return f"{self.prefix}/server/flush"

    def device_of(self, topic: str) -> str:
        """The device id at the end of an ``update/…``, ``mixture/…`` or ``status/…`` topic."""
        parts = topic.split("/")
        if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != self.prefix:
            raise ConfigError(f"topic {topic!r} is not a device topic of fleet {self.fleet!r}")
        return check_id("device", parts[3])
