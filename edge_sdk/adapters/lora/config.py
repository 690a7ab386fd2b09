"""The LoRA spec and its flat parameter layout: the single source of truth for device and server."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.manifest import BaseManifest


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scale and target modules of a LoRA adapter (PEFT's meaning for each field)."""

    r: int = 8  # rank
    alpha: float = 16.0  # scale is alpha / r
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # decoder-layer projections to adapt
    init_seed: int = 0  # seed of the shared initial A matrices (B starts at zero)
    window: int = 0  # adapt only the top `window` decoder layers (0: every layer)

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ConfigError(f"lora window must be >= 0 (0: every layer), got {self.window}")
        if not 1 <= self.r <= 256:
            raise ConfigError(f"lora r must be in 1..256, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be positive, got {self.alpha}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets must be non-empty and unique, got {self.targets}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        out = {
            "kind": "lora",
            "r": self.r,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "init_seed": self.init_seed,
        }
        return {**out, "window": self.window} if self.window else out

    def layers(self, base: BaseManifest) -> range:
        """The decoder layers this adapter adapts."""
        if self.window > base.num_layers:
            raise ConfigError(
                f"lora window {self.window} exceeds the {base.num_layers} layers of {base.name}"
            )
        return range(base.num_layers - self.window if self.window else 0, base.num_layers)

    def within(self, other: LoraSpec) -> bool:
        """Whether this adapter is ``other`` on a sub-window of its layers (the top ``window``
        of them): same rank, scale, targets and init, every adapted layer also adapted by
        ``other``. A window device takes part in a fleet whose adapter it is ``within``."""
        same = replace(self, window=0) == replace(other, window=0)
        return same and (other.window == 0 or 0 < self.window <= other.window)

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        if not isinstance(data, dict) or data.get("kind", "lora") != "lora":
            raise PayloadError(f"adapter spec is not a LoRA spec: {data!r}")
        try:
            return cls(
                r=int(data["r"]),
                alpha=float(data["alpha"]),
                targets=tuple(str(t) for t in data["targets"]),
                init_seed=int(data.get("init_seed", 0)),
                window=int(data.get("window", 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise PayloadError(f"bad LoRA spec {data!r:.200}: {err}") from err

    def layout(self, base: BaseManifest) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter names (PEFT's safetensors keys) and shapes, in the fixed, versioned order:
        layer by layer (the window's only), target by target, A then B."""
        out: list[tuple[str, tuple[int, ...]]] = []
        for layer in self.layers(base):
            for module in self.targets:
                fan_in, fan_out = base.linear_shape(module)
                group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
                out.append((f"{prefix}.lora_A.weight", (self.r, fan_in)))
                out.append((f"{prefix}.lora_B.weight", (fan_out, self.r)))
        return out

    def num_params(self, base: BaseManifest) -> int:
        total = 0
        for _, shape in self.layout(base):
            total += shape[0] * shape[1]
        return total
