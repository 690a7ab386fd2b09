"""Brokers for a fleet on one machine: amqtt embedded in-process (the default) and mosquitto.

amqtt speaks MQTT 3.1.1 only and drops offline messages of anonymous clients; for a fleet that
must survive device outages, run mosquitto (``MosquittoBroker`` starts one with its own config).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetune.edge_sdk.errors import BackendUnavailable, TransportError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts connections; give up early if ``proc`` (a broker) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransportError(
                f"broker exited with code {proc.returncode} before listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TransportError(f"broker did not start listening on {host}:{port} within {timeout:.0f} s")


class EmbeddedBroker:
    """amqtt on its own event-loop thread. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None  # amqtt's Broker, once started

    def __enter__(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as err:
            raise BackendUnavailable(
                "the embedded broker needs amqtt: pip install 'fleetune[server]'"
            ) from err
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        loop = self._loop

        async def start() -> None:
            broker = Broker(config, loop=loop)
            self._broker = broker
            await broker.start()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(start())
            except BaseException as err:  # reported to the owner below
                failure.append(err)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise TransportError(f"embedded broker failed to start: {failure[0]}") from failure[0]
        if not started.is_set():
            raise TransportError("embedded broker did not start within 30 s")
        log.info("embedded amqtt broker on %s:%s", self.host, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is None or self._broker is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
        except Exception as err:  # shutting down: log, don't mask the caller's error
            log.warning("embedded broker shutdown: %s", err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._broker = None


def _tail(path: Path, lines: int = 10) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip() if path.exists() else ""
    return " | ".join(text.splitlines()[-lines:]) or "(empty)"


@dataclass(frozen=True)
class BrokerTls:
    """Mutual TLS for mosquitto: the fleet's CA, the broker's certificate and key, the ACL.
    A client's certificate common name becomes its user name and its client id."""

    ca: Path
    cert: Path
    key: Path
    acl: Path


def mosquitto_conf(
    host: str,
    port: int,
    data_dir: Path,
    tls: BrokerTls | None = None,
    message_size_limit: int = 0,
    save_every_s: int = 0,
) -> str:
    """The mosquitto configuration fleetune runs and ships (``fleetune fleet provision``).

    Retained messages (announcement, adapters, keys) and the queued messages of persistent
    sessions are saved on every change with ``save_every_s = 0`` (``autosave_on_changes``), so a
    broker killed by a signal restarts with everything it had acknowledged, or every
    ``save_every_s`` seconds, losing in a broker crash what it acknowledged since its last save.
    Saving per change writes the broker's whole database (mosquitto 2.0 saves snapshots) once
    per message, a cost that grows with the fleet (``benchmarks/load.py``, README "Fleet
    scale"). A client's queue holds up to
    1 GiB: mosquitto's default of 1,000 queued messages silently drops the rest of a burst of
    updates for the server after the broker acknowledged them to the devices
    (``benchmarks/load.py`` lost 8,879 of 10,000). ``message_size_limit``
    (bytes, 0 = mosquitto's own 256 MB) drops larger payloads, as AWS IoT Core does over 128 KB:
    fleetune sends larger ones in chunks (``edge_sdk/transport/chunks.py``).
    """
    lines = [
        f"listener {port} {host}",
        "persistence true",
        f"persistence_location {data_dir}/",
        f"autosave_on_changes {'false' if save_every_s else 'true'}",
        f"autosave_interval {save_every_s or 1}",
        "max_queued_messages 1000000",  # a burst of updates for the server must all wait
        "max_queued_bytes 1073741824",  # for it; (0 = no limit makes mosquitto 2.0.11
        # disconnect a 3.1.1 client over message_size_limit instead of dropping the message)
        f"message_size_limit {message_size_limit}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if tls is None:
        lines.append("allow_anonymous true")
    else:
        lines += [
            f"cafile {tls.ca}",
            f"certfile {tls.cert}",
            f"keyfile {tls.key}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",  # a device cannot take over another's session
            "allow_anonymous false",
            f"acl_file {tls.acl}",
        ]
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """A real mosquitto on a loopback port with its own config file and data dir.

    ``kill`` (SIGKILL) and ``start`` again keep the data dir: a broker crash, as tests need it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        tls: BrokerTls | None = None,
        message_size_limit: int = 0,
        save_every_s: int = 0,
    ) -> None:
        self.host, self.port, self.tls = host, port or free_port(host), tls
        self.message_size_limit, self.save_every_s = message_size_limit, save_every_s
        self.binary = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> MosquittoBroker:
        if not Path(self.binary).exists():
            raise BackendUnavailable(
                "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="fleetune-mosquitto-")
        root = Path(self._dir.name)
        (root / "data").mkdir()
        conf = mosquitto_conf(
            self.host,
            self.port,
            root / "data",
            self.tls,
            self.message_size_limit,
            self.save_every_s,
        )
        if os.geteuid() == 0:  # as root, mosquitto drops to user mosquitto unless told otherwise
            conf += "user root\n"
        (root / "mosquitto.conf").write_text(conf)
        self.start()
        return self

    @property
    def log(self) -> str:
        """What mosquitto wrote to its log so far."""
        path = Path(self._dir.name) / "mosquitto.log" if self._dir is not None else None
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def start(self) -> None:
        if self._dir is None:
            raise TransportError("MosquittoBroker.start() before __enter__")
        root = Path(self._dir.name)
        log_file = root / "mosquitto.log"
        with open(log_file, "ab") as stderr:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(root / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_port(self.host, self.port, 10, self._proc)
        except TransportError as err:
            tail = _tail(log_file)
            self.close()
            raise TransportError(f"mosquitto failed to start: {err}; its log: {tail}") from err

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would stop it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
