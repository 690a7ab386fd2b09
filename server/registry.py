"""What the server remembers: devices, rounds, updates and adapter versions, through
SQLAlchemy: a SQLite file in the state folder by default, or any database URL
(``[server] database = "postgresql+psycopg://user@host/fleet"``: one database per fleet). The
SQL is the subset SQLite and PostgreSQL share (``ON CONFLICT`` upserts, named parameters)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from fleetune.edge_sdk.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, last_seen DOUBLE PRECISION, state TEXT);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, started DOUBLE PRECISION,
    closed DOUBLE PRECISION, accepted INTEGER, rejected INTEGER, adapter_version INTEGER);
CREATE TABLE IF NOT EXISTS updates (round INTEGER, device TEXT, received DOUBLE PRECISION,
    bytes INTEGER, num_examples INTEGER, accepted INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS adapters (version INTEGER PRIMARY KEY, round INTEGER,
    created DOUBLE PRECISION, sha256 TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS bases (version INTEGER PRIMARY KEY, round INTEGER,
    created DOUBLE PRECISION, k INTEGER, members TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS mixtures (device TEXT, basis_version INTEGER,
    received DOUBLE PRECISION, coef TEXT, heldout_loss DOUBLE PRECISION, cluster INTEGER,
    accepted INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS refused_pushes (device TEXT, received DOUBLE PRECISION, reason TEXT,
    UNIQUE (device, reason));
CREATE TABLE IF NOT EXISTS privacy (who TEXT PRIMARY KEY, releases INTEGER,
    epsilon DOUBLE PRECISION, delta DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS perplexities (round INTEGER, device TEXT, ppl DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS claims (round INTEGER, device TEXT, worker TEXT,
    PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS leader (name TEXT PRIMARY KEY, holder TEXT,
    expires DOUBLE PRECISION)
"""
SEEN = (
    "INSERT INTO devices VALUES (:id, :t, :state) ON CONFLICT (id) DO UPDATE SET "
    "last_seen = excluded.last_seen, state = excluded.state"
)
UPDATE = "INSERT INTO updates VALUES (:r, :device, :t, :nbytes, :n, :ok, :reason)"
PERPLEXITY = "INSERT INTO perplexities VALUES (:r, :device, :ppl)"
SCHEMA_LOCK = 0x666C74  # the advisory lock that serializes creating the schema
FLEET = "*fleet*"  # the privacy row of the whole fleet (device ids cannot contain '*')


def database_url(where: str | Path) -> str:
    """A database URL as it is, a file path as a SQLite URL (its folder made)."""
    if "://" in str(where):
        return str(where)
    Path(where).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(where).resolve()}"


def _sqlite_wal(connection, record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Registry:
    def __init__(self, where: str | Path) -> None:
        url = database_url(where)
        sqlite = url.startswith("sqlite")
        try:
            self._engine = create_engine(
                url,
                connect_args={"check_same_thread": False} if sqlite else {},
                pool_pre_ping=not sqlite,
            )
            if sqlite:  # a commit without a full fsync: the log survives a crash of the
                # server (WAL); accepted updates themselves are synced files (state.py)
                event.listen(self._engine, "connect", _sqlite_wal)
            with self._engine.begin() as conn:
                if not sqlite:  # PostgreSQL's CREATE TABLE IF NOT EXISTS races with another
                    # process's (workers start together): one at a time
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                for statement in SCHEMA.split(";"):
                    conn.execute(text(statement))
        except (SQLAlchemyError, ImportError) as err:
            shown = self._engine.url.render_as_string() if hasattr(self, "_engine") else url
            raise ConfigError(f"cannot open the registry database {shown}: {err}") from err
        self._lock = threading.Lock()  # one writer at a time (SQLite's rule; harmless elsewhere)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def _exec(self, sql: str, **args: object) -> list[tuple]:
        with self._lock, self._engine.begin() as conn:
            result = conn.execute(text(sql), args)
            return [tuple(row) for row in result.fetchall()] if result.returns_rows else []

    def _exec_many(self, *statements: tuple[str, list[dict]]) -> None:
        """Each statement over its rows, all in one transaction (a group commit)."""
        with self._lock, self._engine.begin() as conn:
            for sql, rows in statements:
                if rows:
                    conn.execute(text(sql), rows)

    def seen(self, device: str, state: str = "online") -> None:
        self._exec(SEEN, id=device, t=time.time(), state=state)

    def log_refused_push(self, device: str, reason: str) -> None:
        """A device reported a push it refused (bad signature, malformed, other base); once per
        device and reason (its retained status comes back on every reconnection)."""
        self._exec(
            "INSERT INTO refused_pushes VALUES (:device, :t, :reason) ON CONFLICT DO NOTHING",
            device=device,
            t=time.time(),
            reason=reason,
        )

    def refused_pushes(self) -> list[tuple[str, str]]:
        rows = self._exec("SELECT device, reason FROM refused_pushes")
        return [(str(d), str(r)) for d, r in rows]

    def record_privacy(self, who: str, releases: int, epsilon: float, delta: float) -> None:
        """What differential privacy has spent for a device (or ``FLEET``) so far."""
        self._exec(
            "INSERT INTO privacy VALUES (:who, :n, :eps, :delta) ON CONFLICT (who) DO UPDATE "
            "SET releases = excluded.releases, epsilon = excluded.epsilon, delta = excluded.delta",
            who=who,
            n=releases,
            eps=epsilon,
            delta=delta,
        )

    def privacy(self) -> dict[str, tuple[int, float]]:
        """Releases and epsilon per device, and of the fleet under ``FLEET``."""
        rows = self._exec("SELECT who, releases, epsilon FROM privacy")
        return {str(w): (int(n), float(e)) for w, n, e in rows}

    def claim(self, round_: int, device: str, worker: str) -> bool:
        """Whether ``worker`` is the first to take ``device``'s update of ``round_`` (aggregator
        workers share the update stream: a device's second update may reach another worker)."""
        rows = self._exec(
            "INSERT INTO claims VALUES (:r, :device, :worker) ON CONFLICT DO NOTHING "
            "RETURNING worker",
            r=round_,
            device=device,
            worker=worker,
        )
        return bool(rows)

    def claimed(self, round_: int) -> int:
        """Updates the workers accepted in ``round_`` so far."""
        return int(self._exec("SELECT COUNT(*) FROM claims WHERE round = :r", r=round_)[0][0])

    def lead(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the coordinator's lease for ``ttl_s`` seconds; ``False`` while another
        holder's lease is live (one coordinator folds, however many are started)."""
        now = time.time()
        rows = self._exec(
            "INSERT INTO leader VALUES ('coordinator', :h, :until) ON CONFLICT (name) DO UPDATE "
            "SET holder = excluded.holder, expires = excluded.expires "
            "WHERE leader.expires < :now OR leader.holder = :h RETURNING holder",
            h=holder,
            until=now + ttl_s,
            now=now,
        )
        return bool(rows)

    def resign(self, holder: str) -> None:
        self._exec("DELETE FROM leader WHERE name = 'coordinator' AND holder = :h", h=holder)

    def log_perplexity(self, round_: int, device: str, ppl: float) -> None:
        """The held-out perplexity a device reported with its update (after local tuning)."""
        self._exec(PERPLEXITY, r=round_, device=device, ppl=ppl)

    def log_batch(
        self,
        round_: int,
        updates: list[tuple[str, int, int, bool, str]],
        perplexities: list[tuple[str, float]],
    ) -> None:
        """A batch of updates in one transaction: each one's row (device, bytes, examples,
        accepted, reason), its device seen online, and the perplexities they reported."""
        now = time.time()
        rows = [
            {"r": round_, "device": d, "t": now, "nbytes": b, "n": n, "ok": int(ok), "reason": why}
            for d, b, n, ok, why in updates
        ]
        self._exec_many(
            (UPDATE, rows),
            (
                SEEN,
                [{"id": d, "t": now, "state": "online"} for d in sorted({u[0] for u in updates})],
            ),
            (PERPLEXITY, [{"r": round_, "device": d, "ppl": p} for d, p in perplexities]),
        )

    def perplexities(self) -> dict[str, list[tuple[int, float]]]:
        """Per device, (round, perplexity) in round order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for r, d, p in self._exec("SELECT round, device, ppl FROM perplexities ORDER BY round"):
            out.setdefault(str(d), []).append((int(r), float(p)))
        return out

    def rounds(self) -> list[tuple[int, float, float | None, int, int, int | None]]:
        """(round, started, closed, accepted, rejected, adapter version), in round order."""
        return self._exec("SELECT * FROM rounds ORDER BY round")

    def open_round(self, round_: int) -> None:
        self._exec(
            "INSERT INTO rounds VALUES (:r, :t, NULL, 0, 0, NULL) ON CONFLICT (round) DO UPDATE "
            "SET started = excluded.started, closed = NULL, accepted = 0, rejected = 0, "
            "adapter_version = NULL",
            r=round_,
            t=time.time(),
        )

    def close_round(self, round_: int, accepted: int, rejected: int, version: int) -> None:
        self._exec(
            "UPDATE rounds SET closed = :t, accepted = :a, rejected = :n, adapter_version = :v "
            "WHERE round = :r",
            t=time.time(),
            a=accepted,
            n=rejected,
            v=version,
            r=round_,
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
            UPDATE,
            r=round_,
            device=device,
            t=time.time(),
            nbytes=nbytes,
            n=num_examples,
            ok=int(accepted),
            reason=reason,
        )

    def add_adapter(self, version: int, round_: int, sha256: str, path: str) -> None:
        self._exec(
            "INSERT INTO adapters VALUES (:v, :r, :t, :sha, :path) ON CONFLICT (version) DO "
            "UPDATE SET round = excluded.round, created = excluded.created, "
            "sha256 = excluded.sha256, path = excluded.path",
            v=version,
            r=round_,
            t=time.time(),
            sha=sha256,
            path=path,
        )

    def add_basis(self, version: int, round_: int, k: int, members: str, path: str) -> None:
        self._exec(
            "INSERT INTO bases VALUES (:v, :r, :t, :k, :members, :path) ON CONFLICT (version) "
            "DO UPDATE SET round = excluded.round, created = excluded.created, k = excluded.k, "
            "members = excluded.members, path = excluded.path",
            v=version,
            r=round_,
            t=time.time(),
            k=k,
            members=members,
            path=path,
        )

    def latest_basis(self) -> tuple[int, str] | None:
        rows = self._exec("SELECT version, path FROM bases ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def basis_path(self, version: int) -> str | None:
        rows = self._exec("SELECT path FROM bases WHERE version = :v", v=version)
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
            "INSERT INTO mixtures VALUES (:device, :v, :t, :coef, :loss, :cluster, :ok, :reason)",
            device=device,
            v=basis_version,
            t=time.time(),
            coef=coef,
            loss=heldout_loss,
            cluster=cluster,
            ok=int(not reason),
            reason=reason,
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
        rows = self._exec("SELECT round FROM adapters WHERE version = :v", v=version)
        return int(rows[0][0]) if rows else None

    def last_round(self) -> int:
        """The highest round opened so far (0 before the first)."""
        return int(self._exec("SELECT MAX(round) FROM rounds")[0][0] or 0)

    def latest_adapter(self) -> tuple[int, str] | None:
        rows = self._exec("SELECT version, path FROM adapters ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def rejections(self, last: int = 0) -> list[tuple[int, str, str]]:
        """Refused updates as (round, device, reason), oldest first; ``last``: only the newest."""
        sql = "SELECT round, device, reason, received FROM updates WHERE accepted = 0"
        if last:
            sql = f"SELECT * FROM ({sql} ORDER BY received DESC LIMIT {int(last)}) AS newest"
        rows = self._exec(sql + " ORDER BY received")
        return [(int(r), str(d), str(why)) for r, d, why, _ in rows]

    def refused_count(self) -> int:
        return int(self._exec("SELECT COUNT(*) FROM updates WHERE accepted = 0")[0][0])

    def device_states(self) -> dict[str, int]:
        """How many devices are in each last known state."""
        return {
            str(s): int(n)
            for s, n in self._exec("SELECT state, COUNT(*) FROM devices GROUP BY state")
        }

    def devices(self) -> dict[str, tuple[float, str]]:
        return {d: (float(t), str(s)) for d, t, s in self._exec("SELECT * FROM devices")}

    def close(self) -> None:
        self._engine.dispose()
