"""Server configuration: the ``[server]`` table of the fleet's TOML file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.config import section
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.protocol import MAX_CLUSTERS, MAX_COHORT
from fleetune.edge_sdk.secagg import check_range
from fleetune.edge_sdk.transport.chunks import MIN_LIMIT as MIN_CHUNK_LIMIT
from fleetune.edge_sdk.transport.topics import check_id

if TYPE_CHECKING:
    from fleetune.server.strategy import Strategy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("fedavg", "median", "trimmed_mean", "krum", "dp_fedavg")
DOWNLINK = ("f32", "f16", "q8", "q4")  # what whole adapters and bases may be pushed as
CLUSTER_ASSIGN = ("direction", "loss")  # how a device joins a cluster (server/clusters.py)


@dataclass(frozen=True)
class ServerConfig:
    fleet: str = "default"  # topic namespace: fleetune/<fleet>/...
    host: str = "127.0.0.1"  # MQTT broker
    port: int = 1883
    protocol: str = "3.1.1"  # "3.1.1" or "5"
    base: str = "smollm2-135m"  # named base or local HF checkpoint directory
    rounds: int = 3  # rounds to run, then announce the end
    quorum: int = 2  # updates that close a round early (async: the buffer size)
    round_timeout_s: float = 600.0  # a round closes after this even without a quorum
    mode: str = "sync"  # sync | async: fold every quorum updates, stale ones discounted
    max_staleness: int = 4  # async: refuse updates more adapter versions behind than this
    staleness_exponent: float = 0.5  # async: a stale update weighs (1 + staleness) ** -this
    workers: int = 0  # aggregator workers share the update stream (server/workers.py; 0 = none)
    worker_group: str = "fleetune"  # their MQTT shared-subscription group
    leader_lease_s: float = 30.0  # with workers: the coordinator's lease in the database
    strategy: str = "fedavg"  # fedavg | median | trimmed_mean | krum | dp_fedavg (strategy/)
    norm_bound: float = 0.0  # clip each update's delta to this L2 norm first (0 = off)
    max_examples: int = 100_000  # an update weighs as at most this many training windows
    max_messages_per_round: int = 20  # update messages one device may send a round; beyond
    # that its messages are dropped undecoded (a flood costs the server a counter, not a parse)
    trim: float = 0.2  # trimmed_mean: fraction dropped at each end, per coordinate
    dp_noise_multiplier: float = 1.0  # dp_fedavg: noise std = this * norm_bound on the sum
    dp_delta: float = 1e-5  # dp_fedavg: the delta of the (epsilon, delta) reported
    dp_epsilon_budget: float = 0.0  # dp_fedavg: refuse a device's update beyond this (0 = none)
    secagg: bool = False  # secure aggregation: the server sees only the round's sum
    secagg_bound: float = 1.0  # secagg: each update entry is clipped to +-this
    secagg_scale: float = 1048576.0  # secagg: fixed-point steps per unit (2**20)
    krum_byzantine: int = 1  # krum: Byzantine devices tolerated per round
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_window: int = 0  # adapters on the top K decoder layers only (0: every layer)
    downlink_encoding: str = "f16"  # encoding of the pushed global adapter
    zo_pool_size: int = 4096  # seeds per round that zeroth-order devices draw from (FedKSeed)
    zo_params: str = "lora_b"  # what zeroth-order devices move: lora_b | all
    clusters: int = 0  # keep k cluster adapters and push each device its cluster's (groups
    # formed by update direction, then kept: server/clusters.py; 0 = off)
    cluster_step: float = 1.0  # a cluster adapter moves by this x its members' aggregate change
    cluster_assign: str = "loss"  # after the first round a device joins the cluster whose
    # adapter its canary scores best (loss, IFCA: every cluster adapter is published on
    # adapter/cluster/{c}, K adapters downlink a round) or that its change points to (direction)
    basis_k: int = 0  # keep a basis of this many adapters for mixture devices (0 = none)
    basis_encoding: str = "q8"  # encoding of the pushed basis (K = 8: ~1.5 MB with q8)
    mix_quorum: int = 0  # after the rounds, serve this many mixture devices before stopping
    state_dir: str = ""  # SQLite registry and adapter versions; "" = <cache>/server/<fleet>
    database: str = ""  # the registry's SQLAlchemy URL ("" = SQLite in state_dir), e.g.
    # "postgresql+psycopg://fleetune@db.example/home" (pip install 'fleetune[postgres]')
    signing_key: str = ""  # Ed25519 PEM that signs every push; "" = <state_dir>/signing-key.pem
    # (created on first start; devices pin its public key, <state_dir>/fleet-key.pub)
    metrics_port: int = 0  # Prometheus /metrics on this port (0 = off)
    max_message_bytes: int = 131072  # larger pushes travel in chunks (AWS IoT Core: 128 KB)
    blob_port: int = 0  # instead, serve larger pushes over HTTP and send a reference (0 = off)
    blob_host: str = "127.0.0.1"  # where the blob server listens
    metrics_host: str = "127.0.0.1"  # where /metrics listens
    tls_ca: str = ""  # mutual TLS (`fleetune fleet provision`): the fleet's CA certificate,
    tls_cert: str = ""  # the server's client certificate
    tls_key: str = ""  # and its key; relative paths are read from the config file's folder

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        if self.rounds < 1 or self.quorum < 1 or self.round_timeout_s <= 0:
            raise ConfigError("[server] rounds >= 1, quorum >= 1 and round_timeout_s > 0 required")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"[server] mode must be 'sync' or 'async', got {self.mode!r}")
        if self.max_staleness < 0 or self.staleness_exponent < 0:
            raise ConfigError("[server] max_staleness >= 0 and staleness_exponent >= 0 required")
        if self.mode == "async" and self.secagg:
            raise ConfigError(
                '[server] secagg masks within one round\'s cohort: it needs mode = "sync"'
            )
        if self.workers:
            check_id("worker_group", self.worker_group)
            if self.workers < 0 or not self.summable or self.leader_lease_s <= 0:
                raise ConfigError(
                    '[server] workers sum updates as they come: they need strategy = "fedavg" '
                    "without norm_bound, clusters, basis_k or secagg, and leader_lease_s > 0"
                )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"[server] strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not (self.norm_bound >= 0 and self.max_examples >= 1 and 0 <= self.trim < 0.5):
            raise ConfigError(
                "[server] norm_bound >= 0, max_examples >= 1 and trim in [0, 0.5) required"
            )
        if self.strategy == "dp_fedavg":
            from fleetune.edge_sdk.privacy import check

            args = (
                self.norm_bound,
                self.dp_noise_multiplier,
                self.dp_delta,
                self.dp_epsilon_budget,
            )
            check(*args, "[server] dp_fedavg (norm_bound is the clip norm)")
            if self.norm_bound <= 0:
                raise ConfigError("[server] dp_fedavg needs norm_bound > 0: the clip norm")
        if self.secagg:
            if self.strategy != "fedavg" or self.clusters or self.basis_k:
                raise ConfigError(
                    '[server] secagg opens only the round\'s sum: it needs strategy = "fedavg" '
                    "and no per-device aggregates (clusters = 0, basis_k = 0)"
                )
            check_range(MAX_COHORT, self.secagg_bound, self.secagg_scale)
        if self.krum_byzantine < 0 or self.max_messages_per_round < 1:
            raise ConfigError("[server] krum_byzantine >= 0 and max_messages_per_round >= 1")
        if self.zo_pool_size < 1 or self.zo_params not in ("lora_b", "all"):
            raise ConfigError("[server] zo_pool_size >= 1 and zo_params in (lora_b, all) required")
        if self.downlink_encoding not in DOWNLINK:  # a whole adapter: no sparsity, no seeds
            raise ConfigError(f"[server] downlink_encoding must be one of {DOWNLINK}")
        if not 0 <= self.clusters <= MAX_CLUSTERS:
            raise ConfigError(
                f"[server] clusters must be in 0..{MAX_CLUSTERS}, got {self.clusters}"
            )
        if not 0 < self.cluster_step <= 4:
            raise ConfigError(f"[server] cluster_step must be in (0, 4], got {self.cluster_step}")
        if self.cluster_assign not in CLUSTER_ASSIGN:
            raise ConfigError(
                f"[server] cluster_assign must be one of {CLUSTER_ASSIGN}, "
                f"got {self.cluster_assign!r}"
            )
        if not 0 <= self.basis_k <= 64 or self.mix_quorum < 0:
            raise ConfigError("[server] basis_k must be in 0..64 and mix_quorum >= 0")
        if self.basis_k and self.zo_params != "lora_b":
            raise ConfigError(
                "[server] a mixture basis (basis_k > 0) needs adapters that share LoRA A: "
                'zo_params must be "lora_b"'
            )
        if self.basis_encoding not in DOWNLINK:
            raise ConfigError(f"[server] basis_encoding must be one of {DOWNLINK}")
        if self.max_message_bytes < MIN_CHUNK_LIMIT:
            raise ConfigError(f"[server] max_message_bytes must be >= {MIN_CHUNK_LIMIT}")
        if not 0 <= self.blob_port < 65536:
            raise ConfigError(f"[server] blob_port {self.blob_port} is out of range")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"[server] metrics_port {self.metrics_port} is out of range")
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"[server] protocol must be '3.1.1' or '5', got {self.protocol!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _ = self.spec  # validates the LoRA fields
        self.tls()

    @property
    def summable(self) -> bool:
        """Whether a round is a running sum (FedAvg without clipping), folded as updates
        arrive: nothing needs every update at the end (clusters, a basis, a secure sum)."""
        return self.strategy == "fedavg" and not (
            self.norm_bound or self.clusters or self.basis_k or self.secagg
        )

    @property
    def spec(self) -> LoraSpec:
        """The fleet's adapter."""
        return LoraSpec(
            r=self.lora_r,
            alpha=self.lora_alpha,
            targets=self.lora_targets,
            window=self.lora_window,
        )

    @property
    def staleness_allowed(self) -> int:
        """How many versions behind an update may be: ``max_staleness`` in async rounds, none
        in sync ones."""
        return self.max_staleness if self.mode == "async" else 0

    def mqtt(self, client_id: str):
        """An MQTT connection to the fleet's broker as the server (or one of its workers): an
        update is acknowledged by hand, once it is on disk."""
        from fleetune.edge_sdk.transport.mqtt import MqttTransport

        return MqttTransport(
            self.host,
            self.port,
            client_id,
            protocol=self.protocol,
            tls=self.tls(),
            manual_ack=True,
        )

    def tls(self):
        """The TLS files, or ``None`` for plain TCP."""
        from fleetune.edge_sdk.transport.base import TlsFiles

        return TlsFiles.from_paths(self.tls_ca, self.tls_cert, self.tls_key, "[server]")


def load_server_config(path: str | Path) -> ServerConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    return section(ServerConfig, data.get("server", {}), "server", Path(path).resolve().parent)


def make_strategy(config: ServerConfig) -> Strategy:
    """The configured aggregation strategy, with its knobs."""
    from fleetune.server.strategy import STRATEGIES as CLASSES

    extra: dict[str, dict[str, float]] = {
        "trimmed_mean": {"trim": config.trim},
        "krum": {"byzantine": config.krum_byzantine},
        "dp_fedavg": {"noise_multiplier": config.dp_noise_multiplier},
    }
    return CLASSES[config.strategy](
        norm_bound=config.norm_bound,
        max_examples=config.max_examples,
        **extra.get(config.strategy, {}),
    )
