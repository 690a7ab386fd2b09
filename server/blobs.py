"""The server's side of pushes by reference (``edge_sdk/transport/blobs.py``): a
content-addressed folder served over HTTP, ``GET /blobs/{sha256}``, on a daemon thread."""

from __future__ import annotations

import hashlib
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.store import atomic_write
from fleetune.edge_sdk.transport.blobs import SHA256, reference

log = logging.getLogger(__name__)


class BlobServer:
    """Serves the blobs in ``folder`` over HTTP on a daemon thread; :meth:`put` adds one."""

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        folder_ = self.folder

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                path = folder_ / name
                if not self.path.startswith("/blobs/") or not SHA256.fullmatch(name):
                    self.send_error(404)
                    return
                if not path.exists():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("blob server: " + format, *args)

        try:
            self._http = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise ConfigError(f"[server] blob_port {port} on {host}: {err}") from err
        self.host, self.port = host, self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/blobs"

    def put(self, payload: bytes) -> bytes:
        """Keep ``payload`` and return the reference message for it."""
        atomic_write(self.folder / hashlib.sha256(payload).hexdigest(), payload)
        return reference(payload)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
