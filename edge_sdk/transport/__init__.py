"""Transports: MQTT (paho) for real fleets, an in-process broker for unit tests."""

from fleetune.edge_sdk.transport.base import Message, Transport
from fleetune.edge_sdk.transport.topics import Topics

__all__ = ["Message", "Topics", "Transport"]
