"""fleetune device SDK: personalize a small LLM on the device, federate over MQTT.

Importing this package loads neither torch nor onnxruntime; engines load when a client opens.
"""

from edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig, load_config
from edge_sdk.errors import FleetuneError

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
        from edge_sdk.client import EdgeClient

        return EdgeClient
    raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
