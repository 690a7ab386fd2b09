"""Chunks or a reference: a push above the broker's message limit, to N devices that connect
after it was published (retained, as the global adapter is), over a real mosquitto on loopback
with AWS IoT Core's 128 KB limit (``message_size_limit 131072``).

Arms: ``chunks`` (the payload as retained numbered chunks plus a manifest, over MQTT:
``edge_sdk/transport/chunks.py``) and ``reference`` (the server keeps the bytes in its blob
server, ``server/blobs.py``; MQTT carries 78 bytes, each device fetches over HTTP and checks
the sha256). Per arm and fleet size: seconds from the devices' connect until the last one holds
the verified whole (median of ``--repeats``, each with new client ids), and the bytes the
broker and the blob server send for it (the broker's from the same ``split`` the transport
uses). The payload is random bytes of the f16 global adapter's size: the transport never reads
it. All devices are threads of this process (one paho network thread each), so past a few
dozen the numbers show this process's limits as much as the broker's.

    python -m benchmarks.transfer --json results/bench_transfer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from fleetune.edge_sdk.transport.blobs import reference
from fleetune.edge_sdk.transport.chunks import ChunkedTransport, split
from fleetune.edge_sdk.transport.mqtt import MqttTransport
from fleetune.server.blobs import BlobServer
from fleetune.server.broker import MosquittoBroker

LIMIT = 128 * 1024
TOPIC = "fleetune/bench/adapter/global"


def deliver(broker, n: int, blob_url: str, digest: str, run: str) -> float:
    """Seconds until ``n`` devices that connect now all hold the verified push."""
    times: list[float] = []
    errors: list[BaseException] = []
    go = threading.Barrier(n + 1)

    def device(i: int) -> None:
        inner = MqttTransport(broker.host, broker.port, f"{run}-{i}")
        transport = ChunkedTransport(inner, LIMIT, blob_url=blob_url)
        try:
            transport.subscribe(TOPIC)
            go.wait()
            transport.connect(timeout=60)
            msg = transport.recv(timeout=120)
            if msg is None or hashlib.sha256(msg.payload).hexdigest() != digest:
                raise RuntimeError(f"device {i} got {'nothing' if msg is None else 'other bytes'}")
            times.append(time.monotonic())
        except BaseException as err:
            errors.append(err)
        finally:
            transport.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    began = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    if errors or len(times) != n:
        raise SystemExit(f"{run}: {len(times)} of {n} devices got the push; {errors[:1]}")
    return max(times) - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--bytes", type=int, default=925_000, help="the push's size")
    parser.add_argument("--devices", default="1,10,100")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    payload = os.urandom(args.bytes)
    digest = hashlib.sha256(payload).hexdigest()
    manifest, chunks = split(payload, LIMIT)
    per_device = {
        "chunks": {"mqtt": len(manifest) + sum(map(len, chunks)), "http": 0},
        "reference": {"mqtt": len(reference(payload)), "http": len(payload)},
    }
    rows = []
    with MosquittoBroker(message_size_limit=LIMIT) as broker, tempfile.TemporaryDirectory() as tmp:
        blobs = BlobServer(Path(tmp) / "blobs")
        try:
            for arm in ("chunks", "reference"):
                server = ChunkedTransport(
                    MqttTransport(broker.host, broker.port, f"server-{arm}"),
                    LIMIT,
                    blobs=blobs if arm == "reference" else None,
                )
                server.connect(timeout=10)
                server.publish(TOPIC, payload, retain=True)
                server.close()
                for n in (int(d) for d in args.devices.split(",")):
                    seconds = [
                        deliver(broker, n, blobs.url, digest, f"{arm}-{n}-{r}")
                        for r in range(args.repeats)
                    ]
                    row = {
                        "arm": arm,
                        "devices": n,
                        "seconds": statistics.median(seconds),
                        "seconds_all": seconds,
                        "broker_bytes": n * per_device[arm]["mqtt"],
                        "http_bytes": n * per_device[arm]["http"],
                    }
                    rows.append(row)
                    print(f"{arm}, {n} devices: {row['seconds']:.2f} s", file=sys.stderr)
        finally:
            blobs.close()
    for row in rows:
        other = next(r for r in rows if r["devices"] == row["devices"] and r["arm"] != row["arm"])
        row["seconds_over_other_arm"] = row["seconds"] / other["seconds"]
    doc = {
        "bytes": args.bytes,
        "limit": LIMIT,
        "chunks": len(chunks),
        "per_device_bytes": per_device,
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
