"""An in-process broker with MQTT's retained-message semantics, for unit tests only."""

from __future__ import annotations

import queue
import threading

from paho.mqtt.client import topic_matches_sub

from fleetune.edge_sdk.transport.base import Message


class MemoryBroker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._clients: list[MemoryTransport] = []

    def client(self, client_id: str = "") -> MemoryTransport:
        return MemoryTransport(self, client_id)

    def retained(self, topic: str) -> bytes | None:
        """The retained message on ``topic``, as a newly subscribing client would get it."""
        with self._lock:
            return self._retained.get(topic)

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            clients = list(self._clients)
        for client in clients:
            if any(topic_matches_sub(f, topic) for f in client._filters):
                client._inbox.put(Message(topic, payload, False))


class MemoryTransport:
    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker, self.client_id = broker, client_id
        self._filters: list[str] = []
        self._inbox: queue.Queue[Message] = queue.Queue()

    def deliver(self, message: Message) -> None:
        """Queue ``message`` as if the broker had sent it (a test injecting what a broker
        could deliver: a stale retained copy, a reordering)."""
        self._inbox.put(message)

    def connect(self) -> None:
        with self.broker._lock:
            self.broker._clients.append(self)

    def subscribe(self, topic_filter: str) -> None:
        self._filters.append(topic_filter)
        with self.broker._lock:
            retained = [
                (t, p)
                for t, p in self.broker._retained.items()
                if topic_matches_sub(topic_filter, t)
            ]
        for topic, payload in retained:
            self._inbox.put(Message(topic, payload, True))

    def unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self._filters:
            self._filters.remove(topic_filter)

    def publish(
        self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0
    ) -> None:
        self.broker._route(topic, bytes(payload), retain)

    def recv(self, timeout: float | None = None) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, msg: Message) -> None:
        """Delivery here is immediate and in-process: there is nothing to acknowledge."""

    def close(self) -> None:
        with self.broker._lock:
            if self in self.broker._clients:
                self.broker._clients.remove(self)
