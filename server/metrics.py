"""What the server counts, as Prometheus metrics (``[server] metrics_port`` serves ``/metrics``,
next to the dashboard: ``server/dashboard.py``).

Refusals are counted by a short reason code (``PayloadError.reason``: malformed, other_model,
identity, round, duplicate, seeds, rate_limit); the log and the registry keep the full message.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SERVED = ("base", "global", "local", "cluster", "blend", "kept")  # what a device's canary may serve


def reported_perplexity(metrics: dict) -> float | None:
    """The held-out perplexity a device reported after local tuning, if it is a finite number."""
    ppl = metrics.get("ppl_local")
    if isinstance(ppl, (int, float)) and not isinstance(ppl, bool) and math.isfinite(ppl):
        return float(ppl)
    return None


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("fleetune_rounds", "rounds closed", registry=r)
        self.updates = Counter(
            "fleetune_updates",
            "update messages by result and reason",
            ["result", "reason"],
            registry=r,
        )
        self.update_bytes = Counter("fleetune_update_bytes", "bytes of update messages", registry=r)
        self.push_bytes = Counter("fleetune_push_bytes", "bytes the server pushed", registry=r)
        self.refused_pushes = Counter(
            "fleetune_refused_pushes", "pushes devices reported refusing", ["device"], registry=r
        )
        self.devices = Gauge(
            "fleetune_devices", "devices by last known state", ["state"], registry=r
        )
        self.adapter_version = Gauge(
            "fleetune_adapter_version", "global adapter version", registry=r
        )
        self.aggregation = Histogram(
            "fleetune_aggregation_seconds", "time to aggregate a round and encode it", registry=r
        )
        self.staleness = Histogram(
            "fleetune_update_staleness",
            "adapter versions an accepted update was behind (async rounds)",
            buckets=(0, 1, 2, 4, 8, 16),
            registry=r,
        )
        self.perplexity = Gauge(
            "fleetune_device_perplexity",
            "a device's held-out perplexity after its last local tuning",
            ["device"],
            registry=r,
        )
        self.served = Counter(
            "fleetune_served",
            "accepted updates by the adapter their device serves (edge_sdk/canary.py)",
            ["adapter"],
            registry=r,
        )
        self.epsilon = Gauge(
            "fleetune_privacy_epsilon",
            "differential privacy spent (dp_fedavg): per device, and the fleet's",
            ["who"],
            registry=r,
        )

    def accepted(self, nbytes: int, device: str, metrics: dict) -> None:
        self.updates.labels("accepted", "").inc()
        self.update_bytes.inc(nbytes)
        ppl = reported_perplexity(metrics)
        if ppl is not None:
            self.perplexity.labels(device).set(ppl)
        served = metrics.get("served")
        if served is not None:  # a device's word: known names only, so the labels stay few
            kind = served.split(":", 1)[0] if isinstance(served, str) else ""  # cluster:3
            self.served.labels(kind if kind in SERVED else "other").inc()

    def refused(self, nbytes: int, reason: str) -> None:
        self.updates.labels("refused", reason).inc()
        self.update_bytes.inc(nbytes)

    def count_devices(self, states: dict[str, int]) -> None:
        for state in ("online", "offline"):
            self.devices.labels(state).set(states.get(state, 0))
