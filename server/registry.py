"""What the server remembers, in SQLite: devices, rounds, updates and adapter versions."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, last_seen REAL, state TEXT);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, started REAL, closed REAL,
    accepted INTEGER, rejected INTEGER, adapter_version INTEGER);
CREATE TABLE IF NOT EXISTS updates (round INTEGER, device TEXT, received REAL, bytes INTEGER,
    num_examples INTEGER, accepted INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS adapters (version INTEGER PRIMARY KEY, round INTEGER, created REAL,
    sha256 TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS bases (version INTEGER PRIMARY KEY, round INTEGER, created REAL,
    k INTEGER, members TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS mixtures (device TEXT, basis_version INTEGER, received REAL,
    coef TEXT, heldout_loss REAL, cluster INTEGER, accepted INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS refused_pushes (device TEXT, received REAL, reason TEXT,
    UNIQUE (device, reason));
CREATE TABLE IF NOT EXISTS privacy (who TEXT PRIMARY KEY, releases INTEGER, epsilon REAL,
    delta REAL);
"""
FLEET = "*fleet*"  # the privacy row of the whole fleet (device ids cannot contain '*')


class Registry:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(SCHEMA)

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock, self._db:
            return self._db.execute(sql, args).fetchall()

    def seen(self, device: str, state: str = "online") -> None:
        self._exec(
            "INSERT INTO devices VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "last_seen = excluded.last_seen, state = excluded.state",
            (device, time.time(), state),
        )

    def log_refused_push(self, device: str, reason: str) -> None:
        """A device reported a push it refused (bad signature, malformed, other base); once per
        device and reason (its retained status comes back on every reconnection)."""
        self._exec(
            "INSERT OR IGNORE INTO refused_pushes VALUES (?, ?, ?)", (device, time.time(), reason)
        )

    def refused_pushes(self) -> list[tuple[str, str]]:
        rows = self._exec("SELECT device, reason FROM refused_pushes")
        return [(str(d), str(r)) for d, r in rows]

    def record_privacy(self, who: str, releases: int, epsilon: float, delta: float) -> None:
        """What differential privacy has spent for a device (or ``FLEET``) so far."""
        self._exec(
            "INSERT INTO privacy VALUES (?, ?, ?, ?) ON CONFLICT(who) DO UPDATE SET "
            "releases = excluded.releases, epsilon = excluded.epsilon, delta = excluded.delta",
            (who, releases, epsilon, delta),
        )

    def privacy(self) -> dict[str, tuple[int, float]]:
        """Releases and epsilon per device, and of the fleet under ``FLEET``."""
        rows = self._exec("SELECT who, releases, epsilon FROM privacy")
        return {str(w): (int(n), float(e)) for w, n, e in rows}

    def open_round(self, round_: int) -> None:
        self._exec(
            "INSERT OR REPLACE INTO rounds VALUES (?, ?, NULL, 0, 0, NULL)", (round_, time.time())
        )

    def close_round(self, round_: int, accepted: int, rejected: int, version: int) -> None:
        self._exec(
            "UPDATE rounds SET closed = ?, accepted = ?, rejected = ?, adapter_version = ? "
            "WHERE round = ?",
            (time.time(), accepted, rejected, version, round_),
        )

    def log_update(
        self,
        round_: int,
        device: str,
        nbytes: int,
        num_examples: int,
        accepted: bool,
        reason: str = "",
    ) -> None:
        self._exec(
            "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?)",
            (round_, device, time.time(), nbytes, num_examples, int(accepted), reason),
        )

    def add_adapter(self, version: int, round_: int, sha256: str, path: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?)",
            (version, round_, time.time(), sha256, path),
        )

    def add_basis(self, version: int, round_: int, k: int, members: str, path: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO bases VALUES (?, ?, ?, ?, ?, ?)",
            (version, round_, time.time(), k, members, path),
        )

    def latest_basis(self) -> tuple[int, str] | None:
        rows = self._exec("SELECT version, path FROM bases ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def basis_path(self, version: int) -> str | None:
        rows = self._exec("SELECT path FROM bases WHERE version = ?", (version,))
        return str(rows[0][0]) if rows else None

    def log_mixture(
        self,
        device: str,
        basis_version: int,
        coef: str = "",
        heldout_loss: float | None = None,
        cluster: int | None = None,
        reason: str = "",
    ) -> None:
        """A device's coefficients (JSON) over a basis, and the basis adapter it leans on most;
        or, with ``reason``, why its upload was refused."""
        self._exec(
            "INSERT INTO mixtures VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device,
                basis_version,
                time.time(),
                coef,
                heldout_loss,
                cluster,
                int(not reason),
                reason,
            ),
        )

    def mixtures(self) -> list[tuple[str, int, str, float | None, int | None]]:
        """Accepted mixtures: (device, basis version, coefficients JSON, held-out loss, cluster)."""
        return self._exec(
            "SELECT device, basis_version, coef, heldout_loss, cluster FROM mixtures "
            "WHERE accepted = 1"
        )

    def refused_mixtures(self) -> list[tuple[str, str]]:
        """Refused mixture uploads: (device, reason)."""
        rows = self._exec("SELECT device, reason FROM mixtures WHERE accepted = 0")
        return [(str(d), str(why)) for d, why in rows]

    def open_round_number(self) -> int | None:
        """The latest round that was opened and never closed (a crash), if any."""
        rows = self._exec(
            "SELECT round FROM rounds WHERE closed IS NULL ORDER BY round DESC LIMIT 1"
        )
        return int(rows[0][0]) if rows else None

    def adapter_round(self, version: int) -> int | None:
        rows = self._exec("SELECT round FROM adapters WHERE version = ?", (version,))
        return int(rows[0][0]) if rows else None

    def last_round(self) -> int:
        """The highest round opened so far (0 before the first)."""
        return int(self._exec("SELECT MAX(round) FROM rounds")[0][0] or 0)

    def latest_adapter(self) -> tuple[int, str] | None:
        rows = self._exec("SELECT version, path FROM adapters ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def rejections(self) -> list[tuple[int, str, str]]:
        return [
            (int(r), str(d), str(why))
            for r, d, why in self._exec(
                "SELECT round, device, reason FROM updates WHERE accepted = 0"
            )
        ]

    def device_states(self) -> dict[str, int]:
        """How many devices are in each last known state."""
        return {
            str(s): int(n)
            for s, n in self._exec("SELECT state, COUNT(*) FROM devices GROUP BY state")
        }

    def devices(self) -> dict[str, tuple[float, str]]:
        return {d: (float(t), str(s)) for d, t, s in self._exec("SELECT * FROM devices")}

    def close(self) -> None:
        self._db.close()
