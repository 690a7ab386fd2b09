"""The small interface every transport implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleetune.edge_sdk.errors import ConfigError


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retained: bool = False
    mid: int = 0  # the broker's message id, for a manual acknowledgement (0: none needed)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the fleet's CA, this client's certificate and its key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def from_paths(cls, ca: str, cert: str, key: str, where: str) -> TlsFiles | None:
        """``None`` when all three are empty (plain TCP); a ``ConfigError`` naming ``where``
        when only some are given or a file is missing."""
        given = {"tls_ca": ca, "tls_cert": cert, "tls_key": key}
        if not any(given.values()):
            return None
        for name, path in given.items():
            if not path:
                raise ConfigError(f"{where} {name} is empty: TLS needs all of {sorted(given)}")
            if not Path(path).is_file():
                raise ConfigError(f"{where} {name} = {path!r}: no such file")
        return cls(ca, cert, key)


class Transport(Protocol):
    """Publish/subscribe with QoS 1 semantics. Incoming messages queue up until ``recv``."""

    def connect(self) -> None: ...
    def subscribe(self, topic_filter: str) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None: ...
    def publish(
        self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0
    ) -> None: ...
    def recv(self, timeout: float | None = None) -> Message | None: ...
    def ack(self, msg: Message) -> None: ...
    def close(self) -> None: ...
