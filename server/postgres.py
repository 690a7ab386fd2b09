"""A throwaway PostgreSQL (Debian's ``postgresql`` package) on a free loopback port, for tests
and benchmarks of ``[server] database``: its own data folder, trust auth on loopback only, gone
on exit. As root it runs as the ``postgres`` user (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fleetune.edge_sdk.errors import BackendUnavailable
from fleetune.server.broker import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), ""
    )
    if not found:
        raise BackendUnavailable(
            f"PostgreSQL's {name} is not installed: apt-get install -y postgresql"
        )
    return found


class PostgresServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port(host)
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._as: list[str] = []

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *argv], capture_output=True, text=True, check=True)

    def __enter__(self) -> PostgresServer:
        self._dir = tempfile.TemporaryDirectory(prefix="fleetune-postgres-")
        root = Path(self._dir.name)
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres", "postgres")
        data = root / "data"
        self._run(_binary("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        self._proc = subprocess.Popen(
            [
                *self._as,
                _binary("postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(root),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                "fsync=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [_binary("pg_isready"), "-h", self.host, "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return self
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise BackendUnavailable(f"PostgreSQL did not start: {err[-2000:]}")
            time.sleep(0.2)
        raise BackendUnavailable("PostgreSQL did not accept connections within 30 s")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
