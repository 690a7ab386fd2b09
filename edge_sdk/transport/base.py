"""The small interface every transport implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retained: bool = False


class Transport(Protocol):
    """Publish/subscribe with QoS 1 semantics. Incoming messages queue up until ``recv``."""

    def connect(self) -> None: ...
    def subscribe(self, topic_filter: str) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None: ...
    def publish(
        self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0
    ) -> None: ...
    def recv(self, timeout: float | None = None) -> Message | None: ...
    def close(self) -> None: ...
