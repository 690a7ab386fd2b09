"""LoRA adapters as plain numpy: layout, deterministic init, PEFT-compatible files."""

from fleetune.edge_sdk.adapters.lora.config import LoraSpec
from fleetune.edge_sdk.adapters.lora.io import init_lora, load_peft, save_peft

__all__ = ["LoraSpec", "init_lora", "load_peft", "save_peft"]
