"""Adapter kinds, one folder each. An adapter is a dict of named numpy arrays plus its spec."""

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, load_peft, save_peft

__all__ = ["LoraSpec", "init_lora", "load_peft", "save_peft"]
