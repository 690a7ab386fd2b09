"""MQTT over paho-mqtt 2.x, for devices and the server alike.

paho runs callbacks on its network thread; they never raise: messages go to a queue that the
owner drains with :meth:`MqttTransport.recv`, and connection problems are recorded for it (a refused
CONNACK also wakes :meth:`MqttTransport.connect`, which raises it).
Sessions are persistent (MQTT 3.1.1 ``clean_session=False``; MQTT 5 ``clean_start=False`` with a
session expiry), so QoS 1 messages sent while a device is away wait for it at the broker.
With ``tls`` the client presents its certificate (the fleet's CA checks both ends: ``fleetune
fleet provision``). With ``manual_ack`` a QoS 1 message is acknowledged only when the owner calls
:meth:`MqttTransport.ack` (the server, once the update is on disk): a client killed before that
gets it again from its persistent session.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time

from fleetune.edge_sdk.errors import TransportError
from fleetune.edge_sdk.transport.base import Message, TlsFiles

log = logging.getLogger(__name__)

try:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as err:  # pragma: no cover - paho is a core dependency
    raise ImportError("paho-mqtt is missing: pip install 'paho-mqtt>=2'") from err

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


class MqttTransport:
    """A persistent-session MQTT client with QoS 1 publish and a receive queue."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        protocol: str = "3.1.1",
        keepalive: int = 30,
        session_expiry_s: int = 3600,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        manual_ack: bool = False,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise TransportError(f"MQTT protocol {protocol!r} is not one of {sorted(PROTOCOLS)}")
        self.host, self.port, self.client_id = host, port, client_id
        self.protocol, self.keepalive, self.session_expiry_s = protocol, keepalive, session_expiry_s
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._filters: list[str] = []
        self._connected = threading.Event()
        self._connack = threading.Event()  # the broker answered the CONNECT, yes or no
        self._refusal: str | None = None
        self._closing = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=PROTOCOLS[protocol],
            clean_session=False if protocol == "3.1.1" else None,  # MQTT 5: clean_start below
            manual_ack=manual_ack,
        )
        self._client.max_queued_messages_set(0)
        if tls is not None:
            try:
                self._client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key)
            except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
                raise TransportError(f"TLS files {tls} cannot be loaded: {err}") from err
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread: record, never raise) --------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = (
                f"broker refused the connection: {reason_code} (reason code {reason_code.value})"
            )
            self._connack.set()
            return
        for topic_filter in self._filters:
            client.subscribe(topic_filter, qos=1)
        self._connected.set()
        self._connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code.is_failure and not self._closing:
            log.warning(
                "%s: disconnected from %s:%s (%s)",
                self.client_id,
                self.host,
                self.port,
                reason_code,
            )

    def _on_message(self, client, userdata, msg) -> None:
        self._inbox.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid))

    # -- owner API ----------------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> None:
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
        self._connack.clear()
        self._refusal = None
        try:
            self._client.connect(
                self.host,
                self.port,
                keepalive=self.keepalive,
                clean_start=False if props is not None else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except ssl.SSLError as err:  # the broker or this client refused the other's certificate
            raise TransportError(
                f"TLS handshake with MQTT broker {self.host}:{self.port} failed: {err}"
            ) from err
        except OSError as err:
            raise TransportError(
                f"cannot reach MQTT broker {self.host}:{self.port}: {err}"
            ) from err
        self._client.loop_start()
        answered = self._connack.wait(timeout)
        refusal = self._refusal
        if refusal is not None or not answered:
            self._client.loop_stop()
            reason = refusal or f"no CONNACK within {timeout:.0f} s"
            raise TransportError(f"MQTT connect to {self.host}:{self.port} failed: {reason}")

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe with QoS 1; before ``connect`` the filter is applied on connection."""
        self._filters.append(topic_filter)
        if not self._connected.is_set():
            return
        result, _ = self._client.subscribe(topic_filter, qos=1)
        if result not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise TransportError(f"subscribe to {topic_filter} failed: {paho.error_string(result)}")

    def unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self._filters:
            self._filters.remove(topic_filter)
        result, _ = self._client.unsubscribe(topic_filter)
        if result not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise TransportError(
                f"unsubscribe from {topic_filter} failed: {paho.error_string(result)}"
            )

    def publish(
        self, topic: str, payload: bytes, retain: bool = False, timeout: float = 60.0
    ) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        deadline = time.monotonic() + timeout
        while not self._acknowledged(info, topic):
            if time.monotonic() > deadline:
                raise TransportError(f"publish to {topic} not acknowledged within {timeout:.0f} s")
            time.sleep(0.01)

    @staticmethod
    def _acknowledged(info, topic: str) -> bool:
        """paho raises ``RuntimeError`` / ``ValueError`` for a message it could not send (no
        connection, full queue): a ``TransportError`` here, so a caller's outbox keeps it."""
        try:
            return bool(info.is_published())
        except (RuntimeError, ValueError) as err:
            raise TransportError(f"publish to {topic} failed: {err}") from err

    def recv(self, timeout: float | None = None) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` to the broker (with ``manual_ack``; otherwise paho already did).
        A connection lost since it arrived means the broker will send it again: nothing to do."""
        if msg.mid:
            self._client.ack(msg.mid, 1)

    def close(self) -> None:
        self._closing = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
