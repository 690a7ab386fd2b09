"""What the server keeps on disk: adapter versions (PEFT folders), the registry (SQLite, or the
database ``[server] database`` names), the
members a basis clusters and the bases offered. Everything a restarted server resumes from."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fleetune.edge_sdk.adapters.lora import init_lora, load_peft, save_peft
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.protocol import Fleet
from fleetune.edge_sdk.store import atomic_write
from fleetune.server.registry import Registry

Tensors = dict[str, np.ndarray]
MEMBERS = "members.safetensors"  # each device's latest adapter (B part): what the basis clusters
CLUSTERS = "clusters.safetensors"  # the cluster adapters and their members (server/clusters.py)


class ServerState:
    def __init__(self, root: str | Path, fleet: Fleet, database: str = "") -> None:
        self.root, self.fleet = Path(root), fleet
        self.registry = Registry(database or self.root / "registry.sqlite")

    def save_adapter(self, version: int, tensors: Tensors, round_: int) -> Path:
        path = save_peft(
            self.root / "adapters" / f"v{version:04d}", tensors, self.fleet.spec, self.fleet.base
        )
        sha = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        self.registry.add_adapter(version, round_, sha, str(path))
        return path

    def resume(self) -> tuple[int, int, Tensors]:
        """(adapter version, next round, adapter): v0 from the shared seed on a fresh state; a
        round a crash left open is the next round again (its accepted updates are on disk),
        unless its adapter was already written."""
        latest = self.registry.latest_adapter()
        if latest is None:
            tensors = init_lora(self.fleet.spec, self.fleet.base)
            self.save_adapter(0, tensors, round_=0)
            return 0, 1, tensors
        version, path = latest
        tensors, spec = load_peft(path, self.fleet.base)
        if spec != self.fleet.spec:
            raise ConfigError(f"state in {self.root} holds a {spec} adapter, not {self.fleet.spec}")
        unclosed = self.registry.open_round_number()
        if unclosed is not None and self.registry.adapter_round(version) != unclosed:
            return version, unclosed, tensors
        return version, self.registry.last_round() + 1, tensors

    def _round_dir(self, round_: int) -> Path:
        return self.root / "open-round" / f"r{round_:06d}"

    def _next(self, folder: Path) -> int:
        """The next number in a round's folder (batches and sums share one sequence)."""
        numbers = [int(p.stem[1:]) for p in folder.glob("[bs]*.fltn[sp]") if p.stem[1:].isdigit()]
        return max(numbers, default=-1) + 1

    def save_accepted(self, round_: int, accepted: list[tuple[str, bytes]]) -> None:
        """Accepted updates ``(device, payload)``, durable before the round counts them: one
        file per batch, written and synced once (a group commit), renamed into place."""
        folder = self._round_dir(round_)
        folder.mkdir(parents=True, exist_ok=True)
        records = [
            struct.pack(">H", len(d.encode())) + d.encode() + struct.pack(">I", len(p)) + p
            for d, p in accepted
        ]
        atomic_write(folder / f"b{self._next(folder):06d}.fltns", b"".join(records))

    def save_sum(self, round_: int, encoded: bytes) -> None:
        """The round's running sum so far (``workers.Partial``, with its devices), in place of
        the batches before it: a batch of large updates is durable as the sum it changed, one
        adapter's worth of bytes instead of every update's."""
        folder = self._round_dir(round_)
        folder.mkdir(parents=True, exist_ok=True)
        at = self._next(folder)
        atomic_write(folder / f"s{at:06d}.fltnp", encoded)
        for older in folder.glob("[bs]*.fltn[sp]"):  # covered by the sum (a crash before
            if older.stem[1:].isdigit() and int(older.stem[1:]) < at:  # this leaves them
                older.unlink(missing_ok=True)  # for the sum to outrank: see accepted())

    def accepted(self, round_: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """What a round had accepted before a crash: its latest saved running sum (or None)
        and the updates saved after it, as (device, payload), in order."""
        folder = self._round_dir(round_)
        sums = sorted(folder.glob("s*.fltnp"))
        since = int(sums[-1].stem[1:]) if sums else -1
        out = []
        for path in sorted(folder.glob("*.fltn*")):
            data, at = path.read_bytes(), 0
            if path.suffix == ".fltn":  # one update per file (written before group commits),
                if not sums:  # in the sum if there is one
                    out.append((path.stem, data))
                continue
            if path.suffix != ".fltns" or int(path.stem[1:]) < since:
                continue
            while at < len(data):
                (n,) = struct.unpack_from(">H", data, at)
                device = data[at + 2 : at + 2 + n].decode()
                (size,) = struct.unpack_from(">I", data, at + 2 + n)
                at += 6 + n + size
                out.append((device, data[at - size : at]))
        return (sums[-1].read_bytes() if sums else None), out

    def close_round(self, round_: int) -> None:
        shutil.rmtree(self._round_dir(round_), ignore_errors=True)

    def load_members(self) -> dict[str, np.ndarray]:
        path = self.root / MEMBERS
        return load_file(str(path)) if path.exists() else {}

    def save_members(self, members: dict[str, np.ndarray]) -> None:
        save_file(members, str(self.root / MEMBERS))

    def load_clusters(self) -> dict[str, np.ndarray]:
        path = self.root / CLUSTERS
        return load_file(str(path)) if path.exists() else {}

    def save_clusters(self, state: dict[str, np.ndarray]) -> None:
        save_file(state, str(self.root / CLUSTERS))

    def save_basis(self, version: int, vectors: np.ndarray) -> Path:
        path = self.root / "bases" / f"v{version:04d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        return path

    def basis_vectors(self, version: int) -> np.ndarray:
        """The vectors of a basis this fleet offered; ``PayloadError`` if it never did."""
        path = self.registry.basis_path(version)
        if path is None or not Path(path).exists():
            raise PayloadError(f"mixture is over basis v{version}, which this server never offered")
        return np.load(path)

    def close(self) -> None:
        self.registry.close()
