"""What a device keeps on disk: an outbox of updates not yet acknowledged by the broker, the
global adapter it holds and the adapter it serves. Writes are atomic (temp file + rename), so
a reboot or a broker outage loses nothing: pending updates are sent again on the next
connection."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a synced temp file renamed over it, so a reader (or
    a reboot) sees the old content or the new, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class DeviceStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.outbox = self.root / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)

    def put(self, topic: str, payload: bytes) -> Path:
        """Queue a message; it stays until :meth:`done` is called after the broker's PUBACK."""
        seq = max((int(p.name.split(".")[0]) for p in self.outbox.glob("*.msg")), default=0) + 1
        path = self.outbox / f"{seq:08d}.msg"
        head = json.dumps({"topic": topic}).encode() + b"\n"
        atomic_write(path, head + payload)
        return path

    def pending(self) -> list[tuple[Path, str, bytes]]:
        """Queued messages, oldest first, as (path, topic, payload)."""
        out = []
        for path in sorted(self.outbox.glob("*.msg")):
            head, _, payload = path.read_bytes().partition(b"\n")
            out.append((path, json.loads(head)["topic"], payload))
        return out

    def queued(self) -> int:
        """How many messages wait in the outbox (names only: nothing is read)."""
        return sum(1 for _ in self.outbox.glob("*.msg"))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def save_adapter(self, envelope: bytes) -> None:
        """Keep the adapter the device runs (an envelope as received from the server)."""
        atomic_write(self.root / "adapter.fltn", envelope)

    def load_adapter(self) -> bytes | None:
        path = self.root / "adapter.fltn"
        return path.read_bytes() if path.exists() else None

    def save_served(self, envelope: bytes) -> None:
        """Keep the adapter the canary serves (the device's own line), for after a reboot."""
        atomic_write(self.root / "served.fltn", envelope)

    def load_served(self) -> bytes | None:
        path = self.root / "served.fltn"
        return path.read_bytes() if path.exists() else None

    def releases(self) -> int:
        """Updates this device sent under local differential privacy (each spends epsilon)."""
        path = self.root / "privacy.json"
        return int(json.loads(path.read_text())["releases"]) if path.exists() else 0

    def released(self) -> int:
        """Count one more release, durably; returns the new count."""
        count = self.releases() + 1
        atomic_write(self.root / "privacy.json", json.dumps({"releases": count}).encode())
        return count

    def masking_key(self) -> bytes:
        """This device's X25519 key for secure aggregation (raw 32 bytes), made at first use
        and readable by its owner only."""
        path = self.root / "masking.key"
        if not path.exists():
            from fleetune.edge_sdk.secagg import MaskingKey

            atomic_write(path, MaskingKey().to_bytes())
            path.chmod(0o600)
        return path.read_bytes()

    def save_keys(self, signed: bytes) -> None:
        """Keep the fleet's latest signed key list, so a rotation survives a reboot."""
        atomic_write(self.root / "keys.flts", signed)

    def load_keys(self) -> bytes | None:
        path = self.root / "keys.flts"
        return path.read_bytes() if path.exists() else None
