"""Frozen configuration per concern. One TOML file maps 1:1 onto them::

[device]            [tuning]          [sync]               [server]  (server/config.py)
id = "pi-kitchen"   steps = 10        host = "127.0.0.1"   rounds = 3
backend = "torch"   lr = 1e-3         fleet = "demo"       quorum = 4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fleetune.edge_sdk.codec.compress import parse_encoding
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.transport.chunks import MIN_LIMIT as MIN_CHUNK_LIMIT
from fleetune.edge_sdk.transport.topics import check_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("torch", "onnx", "llamacpp")
PRECISIONS = {
    "torch": ("", "fp32", "bf16", "int8", "int4"),  # all but fp32: layer windows (torch_window.py)
    "onnx": ("", "fp32", "int8"),
    "llamacpp": ("", "q8_0", "q4_0", "q4_1", "f16"),
}
TUNERS = ("backprop", "zo", "mix", "window")
BACKPROP_PARAMS = ("all", "lora_b")
ZO_PARAMS = ("lora_b", "all")
STARTS = ("served", "global", "cluster")
SHARES = ("all", "lora_a")


@dataclass(frozen=True)
class DeviceConfig:
    id: str = "device-0"  # unique in the fleet; becomes a topic level
    base: str = "smollm2-135m"  # the base model; names the default bundle location
    backend: str = "torch"  # inference engine: onnx | llamacpp | torch (the reference)
    threads: int = 1  # engine threads; keep 1 per device when simulating several on one CPU
    bundle: str = ""  # device bundle dir (`fleetune export onnx|gguf|hf --out DIR`);
    # "" = <cache>/bundles/<base>/<format> (fleetune.edge_sdk.bundle.default_bundle_dir)
    precision: str = ""  # onnx: fp32 | int8 (weight-only); llamacpp: q8_0 | q4_0 | q4_1 | f16;
    # torch: fp32 | bf16 | int8 (a layer window's frozen weights, backprop in the window)
    # ("" = the engine's default: onnx fp32, llamacpp q8_0)
    state_dir: str = ""  # outbox and current adapter; "" = <cache>/devices/<id>
    memory_budget_mb: float = 0  # a tuning step's peak RSS bound: batch and window length are
    # fitted to it from measured footprints (edge_sdk/memory.py); 0 = no bound

    def __post_init__(self) -> None:
        try:
            check_id("device", self.id)
        except ConfigError as err:
            raise ConfigError(f"[device] id: {err}") from err
        if self.backend not in BACKENDS:
            raise ConfigError(f"[device] backend {self.backend!r} is not one of {BACKENDS}")
        if self.backend in PRECISIONS and self.precision not in PRECISIONS[self.backend]:
            raise ConfigError(
                f"[device] precision {self.precision!r} is not one of "
                f"{PRECISIONS[self.backend]} for the {self.backend} backend"
            )
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"[device] threads must be in 1..256, got {self.threads}")
        if not self.memory_budget_mb >= 0:
            raise ConfigError(
                f"[device] memory_budget_mb must be >= 0 (0: no bound), got {self.memory_budget_mb}"
            )


@dataclass(frozen=True)
class TuningConfig:
    tuner: str = "backprop"  # how the adapter is trained on the device
    steps: int = 10  # optimizer steps per round
    lr: float = 1e-3  # learning rate (AdamW for backprop)
    batch_size: int = 4  # windows per step
    seq_len: int = 64  # tokens per window
    max_eval_windows: int = 24  # held-out windows scored for perplexity
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / r)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # adapted projections
    lora_window: int = 0  # adapt only the top K decoder layers (0: all; tuners/window.py;
    # -1 with tuner = "window": the deepest window [device] memory_budget_mb fits)
    seed: int = 0  # batch sampling seed (mixed with device id and round)
    start: str = "served"  # each round tunes from: served (what the canary serves) | global |
    # cluster (its latest cluster adapter from the server, IFCA; the global until one comes)
    share: str = "all"  # what a dense update sends: all | lora_a (shared A, B stays: FedSA-LoRA)
    blend: float = 0.5  # the canary also weighs the device's last tuning moved this far toward
    # the fleet's adapter it scored best (its best cluster's, else the global; 0: not offered)
    zo_lr: float = 1e-2  # zeroth-order step size (B-only LoRA: best of a sweep, shared/research)
    zo_eps: float = 1e-3  # zeroth-order perturbation scale
    zo_perturbations: int = 1  # directions per zeroth-order step (sub-steps of lr / n each)
    zo_schedule: str = "constant"  # zeroth-order lr schedule: constant | linear | cosine
    zo_eps_schedule: str = "constant"  # zeroth-order eps schedule: constant | linear | cosine
    zo_params: str = "lora_b"  # what zeroth-order moves: lora_b (A frozen from the seed) | all
    backprop_params: str = "all"  # what backprop moves: all | lora_b (its adapters can be mixed)
    mix_lr: float = 0.3  # mixture search: coefficient step size
    mix_eps: float = 0.1  # mixture search: coefficient perturbation
    mix_groups: int = 1  # coefficients per basis adapter (layer groups)
    mix_eval_every: int = 10  # mixture search: validation every this many steps
    mix_patience: int = 3  # mixture search: stop after this many evaluations without progress
    mix_zo_steps: int = 0  # then plain B-only ZO steps from the mix (kept if validation improves)

    def __post_init__(self) -> None:
        if self.tuner not in TUNERS:
            raise ConfigError(f"[tuning] tuner {self.tuner!r} is not one of {TUNERS}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 8 or self.max_eval_windows < 1:
            raise ConfigError(
                "[tuning] steps >= 0, batch_size >= 1, seq_len >= 8 and "
                "max_eval_windows >= 1 are required"
            )
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"[tuning] lr must be in (0, 1), got {self.lr}")
        if self.start not in STARTS:
            raise ConfigError(f"[tuning] start {self.start!r} is not one of {STARTS}")
        if self.share not in SHARES:
            raise ConfigError(f"[tuning] share {self.share!r} is not one of {SHARES}")
        if self.share == "lora_a" and (
            self.tuner != "backprop" or self.backprop_params != "all" or self.start != "served"
        ):
            raise ConfigError(
                '[tuning] share = "lora_a" (FedSA-LoRA) needs tuner = "backprop" moving A and B '
                '(backprop_params = "all") and start = "served": B is the device\'s own'
            )
        auto = self.lora_window == -1 and self.tuner == "window"
        if (self.lora_window < 0 and not auto) or (self.tuner == "window" and not self.lora_window):
            raise ConfigError(
                '[tuning] lora_window must be >= 0, and tuner = "window" (backprop through '
                "the top layers) needs lora_window = K > 0, or -1 for the deepest window the "
                f"memory budget fits; got {self.lora_window}"
            )
        if self.zo_params not in ZO_PARAMS:
            raise ConfigError(f"[tuning] zo_params must be one of {ZO_PARAMS}")
        if not 0.0 <= self.blend < 1.0:
            raise ConfigError(f"[tuning] blend must be in [0, 1), got {self.blend}")
        if self.mix_zo_steps < 0:
            raise ConfigError("[tuning] mix_zo_steps must be >= 0")
        if self.backprop_params not in BACKPROP_PARAMS:
            raise ConfigError(f"[tuning] backprop_params must be one of {BACKPROP_PARAMS}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.zo()  # validates the zeroth-order fields
        try:
            self.mix()
        except ConfigError as err:
            raise ConfigError(f"[tuning] {err}") from err

    def zo(self, pool_seed: int = 0, pool_size: int = 4096):
        from fleetune.edge_sdk.tuners.zo import ZOConfig

        return ZOConfig(
            lr=self.zo_lr,
            eps=self.zo_eps,
            perturbations=self.zo_perturbations,
            schedule=self.zo_schedule,
            eps_schedule=self.zo_eps_schedule,
            pool_seed=pool_seed,
            pool_size=pool_size,
        )

    def mix(self):
        from fleetune.edge_sdk.tuners.mix import MixConfig

        return MixConfig(
            steps=self.steps,
            lr=self.mix_lr,
            eps=self.mix_eps,
            groups=self.mix_groups,
            eval_every=self.mix_eval_every,
            patience=self.mix_patience,
        )


@dataclass(frozen=True)
class SyncConfig:
    host: str = "127.0.0.1"  # MQTT broker
    port: int = 1883
    fleet: str = "default"  # topic namespace: fleetune/<fleet>/...
    protocol: str = "3.1.1"  # "3.1.1" or "5"
    uplink_encoding: str = "q8"  # dense updates: f32 | f16 | q8 | q4 | sq8 | sq4 | topk:F+VALUE
    error_feedback: bool = True  # carry what a lossy uplink dropped into the next update
    max_message_bytes: int = 131072  # larger payloads travel in chunks (AWS IoT Core: 128 KB)
    blob_url: str = ""  # where pushes by reference are fetched: http://server:port/blobs
    round_wait_s: float = 600.0  # how long a device waits for the next announcement
    fleet_key: str = ""  # the fleet's Ed25519 public key (64 hex digits): pushes must be signed
    tls_ca: str = ""  # mutual TLS (`fleetune fleet provision`): the fleet's CA certificate,
    tls_cert: str = ""  # this device's certificate (its common name is the device id)
    tls_key: str = ""  # and its key; relative paths are read from the config file's folder

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"[sync] protocol must be '3.1.1' or '5', got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"[sync] port {self.port} is out of range")
        if self.max_message_bytes < MIN_CHUNK_LIMIT:
            raise ConfigError(f"[sync] max_message_bytes must be >= {MIN_CHUNK_LIMIT}")
        try:
            if parse_encoding(self.uplink_encoding).value in ("seeds", "secagg"):
                raise PayloadError("seeds and secagg are chosen by the tuner and the round")
        except PayloadError as err:
            raise ConfigError(f"[sync] uplink_encoding: {err}") from err
        if self.fleet_key:
            from fleetune.edge_sdk.signing import parse_key

            parse_key(self.fleet_key)
        self.tls()

    def tls(self):
        """The TLS files, or ``None`` for plain TCP."""
        from fleetune.edge_sdk.transport.base import TlsFiles

        return TlsFiles.from_paths(self.tls_ca, self.tls_cert, self.tls_key, "[sync]")


@dataclass(frozen=True)
class PrivacyConfig:
    """Local differential privacy (``edge_sdk/privacy.py``): the device clips and noises its own
    dense update before it leaves. Off by default (noise_multiplier = 0)."""

    clip_norm: float = 1.0  # L2 bound on one update (all tensors together)
    noise_multiplier: float = 0.0  # noise std = noise_multiplier * clip_norm (0 = off)
    delta: float = 1e-5  # the delta of the (epsilon, delta) reported
    epsilon_budget: float = 0.0  # stop uploading once one more would spend beyond this (0 = none)

    def __post_init__(self) -> None:
        from fleetune.edge_sdk.privacy import check

        args = (self.clip_norm, self.noise_multiplier, self.delta, self.epsilon_budget)
        check(*args, "[privacy]")

    @property
    def on(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class FleetuneConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.privacy.on and self.tuning.tuner != "backprop":
            raise ConfigError(
                '[privacy] local noise goes on a dense update: it needs tuner = "backprop" '
                f"(a {self.tuning.tuner} device uploads seeds or coefficients)"
            )
        dev = self.device
        if self.tuning.lora_window == -1 and not (dev.backend == "torch" and dev.memory_budget_mb):
            raise ConfigError(
                "[tuning] lora_window = -1 (the deepest window that fits) needs backend = "
                '"torch" and [device] memory_budget_mb > 0, the budget it is fitted to'
            )
        if (
            dev.backend == "torch"
            and dev.precision not in ("", "fp32")  # the others: layer windows only
            and self.tuning.tuner != "window"
        ):
            raise ConfigError(
                f'[device] precision = "{dev.precision}" (torch) is for backprop in a layer '
                f'window: it needs tuner = "window" with lora_window = K, not tuner = '
                f'"{self.tuning.tuner}" (a zeroth-order step\'s loss difference would drown in '
                "its rounding)"
            )


PATH_KEYS = ("tls_ca", "tls_cert", "tls_key", "signing_key", "state_dir", "bundle")


def section(cls: type, data: dict[str, Any], name: str, folder: Path | None = None) -> Any:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys by name; relative file
    paths (``PATH_KEYS``) are taken from ``folder``, the config file's."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table")
    if folder is not None:
        data = {
            k: str(folder / v) if k in PATH_KEYS and isinstance(v, str) and v else v
            for k, v in data.items()
        }
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except TypeError as err:
        raise ConfigError(f"[{name}]: {err}") from err


def load_config(path: str | Path) -> FleetuneConfig:
    """Read the [device], [tuning], [sync] and [privacy] tables of a TOML file (others are
    ignored)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    folder = Path(path).resolve().parent
    return FleetuneConfig(
        device=section(DeviceConfig, data.get("device", {}), "device", folder),
        tuning=section(TuningConfig, data.get("tuning", {}), "tuning"),
        sync=section(SyncConfig, data.get("sync", {}), "sync", folder),
        privacy=section(PrivacyConfig, data.get("privacy", {}), "privacy"),
    )
