"""What a device must know about its base model: identity (weights hash) and shape.

``models/`` writes these manifests; the device and the server only read them. Every adapter and
update names the ``sha256`` of the base it belongs to, so an update for another model is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fleetune.edge_sdk.errors import ConfigError

MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class BaseManifest:
    """Identity and architecture of a base model."""

    name: str  # human name, e.g. "smollm2-135m"
    sha256: str  # hash of the source weights: the base's identity on the wire
    architecture: str  # Hugging Face model_type, e.g. "llama"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    hf_dir: str = ""  # local Hugging Face copy (weights + tokenizer), if any
    source: str = ""  # where the weights came from (GGUF file or checkpoint directory)
    schema: int = MANIFEST_SCHEMA

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(f"manifest {self.name!r}: sha256 must be 64 hex digits")
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, field)) <= 0:
                raise ConfigError(f"manifest {self.name!r}: {field} must be positive")

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a decoder-layer projection, by its HF name."""
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_dim),
            "k_proj": (self.hidden_size, kv_dim),
            "v_proj": (self.hidden_size, kv_dim),
            "o_proj": (q_dim, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if module not in shapes:
            raise ConfigError(f"unknown target module {module!r}; choose from {sorted(shapes)}")
        return shapes[module]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> BaseManifest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("name", "sha256", "num_layers", "hidden_size") if k not in known]
        if missing:
            raise ConfigError(f"base manifest lacks {missing}")
        if known.get("schema", MANIFEST_SCHEMA) != MANIFEST_SCHEMA:
            raise ConfigError(f"base manifest schema {known['schema']} is not {MANIFEST_SCHEMA}")
        return cls(**known)

    @classmethod
    def load(cls, path: str | Path) -> BaseManifest:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read base manifest {path}: {err}") from err
