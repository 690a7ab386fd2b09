"""fleetune device SDK: personalize a small LLM on the device, federate over MQTT.

The bottom layer: it imports nothing from ``fleetune.server`` or ``fleetune.models``. Importing it
loads neither torch nor onnxruntime; an engine loads when a client opens its bundle.
"""

from fleetune.edge_sdk.config import (
    DeviceConfig,
    FleetuneConfig,
    SyncConfig,
    TuningConfig,
    load_config,
)
from fleetune.edge_sdk.errors import FleetuneError

__all__ = [
    "DeviceConfig",
    "EdgeClient",
    "FleetuneConfig",
    "FleetuneError",
    "SyncConfig",
    "TuningConfig",
    "load_config",
]


def __getattr__(name: str):
    if name == "EdgeClient":
        from fleetune.edge_sdk.client import EdgeClient

        return EdgeClient
    raise AttributeError(f"module 'fleetune.edge_sdk' has no attribute {name!r}")
