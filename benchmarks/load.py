"""Fleet scale on one machine: N simulated devices against the real server over mosquitto on
loopback, one round each, for ZO seed updates and dense q8 LoRA updates.

Devices are light: paho clients driven by one selector loop in this process (one MQTT
connection each, QoS 1, a real announcement triggers each upload), each sending a valid update
of the real adapter's size (SmolLM2-135M, LoRA r=8 on q,v): a seed run of ``--zo-pairs``
(seed, coefficient) pairs, or a q8 dense delta of random values (521 KB), encoded before the
round. The server is the product's ``FleetServer`` in its own process (``quorum`` = N, one round):
it checks, saves and acknowledges each update, aggregates (FedAvg) and pushes. Reported per run:
the round's seconds (open to pushed), updates aggregated per second (N / round seconds), the
ingest rate alone (updates over the seconds from the first accepted one to the last, from the
registry: the rest of a round is the devices' reaction and the fold), the server's peak RSS,
and updates lost (published and acknowledged by the broker, but not counted
by the server). Both sides share this machine's cores, as they would on one box.

Two modes per run (``kind:N`` or ``kind:N:backlog``). *live*: the devices upload when the
announcement reaches them, so the round also times this process's 1 thread of N paho clients.
*backlog*: the server's persistent session is made first, the devices upload while it is
offline (the broker queues their updates for it), and then the server starts: its round is
the server alone draining and folding N updates, which is what ``updates_per_s_*`` report.

    python -m benchmarks.load --json results/bench_load.json
    python -m benchmarks.load --runs zo:100,dense:20 --json /tmp/load.json   # a smoke run
    python -m benchmarks.load --workers 2 --postgres --runs zo:1000,dense:1000 \
        --json results/bench_load_workers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.roundtrip import SMOLLM2
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.protocol import Fleet, SeedRun, Update
from fleetune.edge_sdk.signing import Signer
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.broker import MosquittoBroker
from fleetune.server.postgres import PostgresServer
from fleetune.server.seeds import SeedPools

FLEET = "load"
SERVER = """
import json, sys, dataclasses
from benchmarks.roundtrip import SMOLLM2
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig
config = ServerConfig(**json.loads(sys.argv[1]))
server = FleetServer(config, SMOLLM2)
(result,) = server.run()
first, last = server.registry._exec(
    "SELECT MIN(received), MAX(received) FROM updates WHERE accepted = 1")[0]
server.close()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": result.seconds, "accepted": len(result.accepted),
                  "rejected": len(result.rejected), "rss_mb": int(hwm) / 1024,
                  "ingest_s": (last - first) if first is not None else None}))
"""

WORKER = """
import json, signal, sys, threading
from benchmarks.roundtrip import SMOLLM2
from fleetune.server.config import ServerConfig
from fleetune.server.workers import AggregatorWorker
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
worker = AggregatorWorker(ServerConfig(**json.loads(sys.argv[1])), SMOLLM2, sys.argv[2])
worker.run(stop, lambda: print("ready", flush=True))
print(worker.accepted)
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def payloads(kind: str, n: int, pairs: int) -> list[bytes]:
    """One valid round-1 update per device, from adapter v0."""
    spec = LoraSpec()
    fleet, layout = Fleet(SMOLLM2, spec), FlatLayout(spec, SMOLLM2)
    rng = np.random.default_rng(0)
    out = []
    if kind == "zo":
        pool = SeedPools(FLEET, layout, 4096, "lora_b").pool(1)
        for i in range(n):
            picks = [
                (int(s), float(c))
                for s, c in zip(
                    rng.integers(0, 4096, pairs), rng.normal(0, 1e-3, pairs), strict=True
                )
            ]
            run = SeedRun.from_pairs(picks, pool.pool_seed, pool.params)
            out.append(Update(f"d{i}", 1, 0, 100, seeds=run).encode(fleet))
        return out
    shapes = init_lora(spec, SMOLLM2)
    for i in range(n):
        delta = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in shapes.items()}
        out.append(Update(f"d{i}", 1, 0, 100, delta=delta).encode(fleet, "q8"))
    return out


class Swarm:
    """``len(bodies)`` MQTT clients in one thread: paho's external loop over a selector. Each
    subscribes to the round announcement and publishes its body (QoS 1) when it arrives."""

    def __init__(self, host: str, port: int, bodies: list[bytes]) -> None:
        self.topics, self.bodies = Topics(FLEET), bodies
        self.selector = selectors.DefaultSelector()
        self.clients: list[paho.Client] = []
        self.connected = self.sent = self.acked = 0
        for i in range(len(bodies)):
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{FLEET}-d{i}")
            client.max_inflight_messages_set(1)
            client.user_data_set(i)
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            client.connect(host, port, keepalive=600)
            self.selector.register(client.socket(), selectors.EVENT_READ, client)  # type: ignore[arg-type]
            self.clients.append(client)
            if i % 200 == 0:
                self.pump(0)

    def _on_connect(self, client, i, flags, reason_code, properties) -> None:
        self.connected += 1
        client.subscribe(self.topics.round, qos=1)

    def _on_message(self, client, i, msg) -> None:
        if msg.topic == self.topics.round and self.bodies[i]:
            client.publish(self.topics.update(f"d{i}"), self.bodies[i], qos=1)
            self.bodies[i] = b""  # once
            self.sent += 1

    def _on_publish(self, client, i, mid, reason_code, properties) -> None:
        self.acked += 1

    def upload_all(self) -> None:
        """Every device uploads now, without waiting for an announcement (backlog mode)."""
        for i, client in enumerate(self.clients):
            client.publish(self.topics.update(f"d{i}"), self.bodies[i], qos=1)
            self.bodies[i] = b""
            self.sent += 1
            if i % 50 == 0:
                self.pump(0)

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.data.loop_read()
        for client in self.clients:
            if client.want_write():
                client.loop_write()

    def run_until(self, done, timeout: float) -> bool:
        deadline, misc = time.monotonic() + timeout, 0.0
        while not done() and time.monotonic() < deadline:
            self.pump(0.05)
            if time.monotonic() - misc > 5:
                for client in self.clients:
                    client.loop_misc()
                misc = time.monotonic()
        return done()

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_write()
        self.selector.close()


def server_session(host: str, port: int) -> None:
    """The server's persistent session, subscribed to updates, so the broker queues them for it
    while it is offline (its client id, QoS 1, as ``FleetServer`` connects)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{FLEET}-server", clean_session=False
    )
    client.connect(host, port)
    client.loop_start()
    client.subscribe(Topics(FLEET).all_updates, qos=1)
    deadline = time.monotonic() + 10
    while client.is_connected() is False and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the SUBACK
    client.disconnect()
    client.loop_stop()


def one_run(
    kind: str,
    n: int,
    pairs: int,
    timeout: float,
    workers: int,
    database: str,
    backlog: bool,
    save_every_s: int,
) -> dict:
    if backlog and workers:
        raise SystemExit("backlog runs time the plain server; drop --workers for them")
    log(f"{kind} x {n}: encoding updates")
    bodies = payloads(kind, n, pairs)
    size = len(bodies[0])
    with (
        MosquittoBroker(save_every_s=save_every_s) as broker,
        tempfile.TemporaryDirectory() as state,
    ):
        config = {
            "fleet": FLEET,
            "port": broker.port,
            "rounds": 1,
            "quorum": n,
            "round_timeout_s": timeout,
            "state_dir": state,
            "workers": workers,
            "database": database,
        }
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        signer = Signer.load_or_create(Path(state) / "signing-key.pem")  # workers verify with it
        (Path(state) / "fleet-key.pub").write_text(signer.public_hex + "\n")
        crew = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(config), f"w{i}"],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(workers)
        ]
        for worker in crew:  # connected and subscribed before updates flow
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        if backlog:
            server_session(broker.host, broker.port)
        swarm = Swarm(broker.host, broker.port, bodies)
        swarm.run_until(lambda: swarm.connected == n, 120)
        if backlog:
            swarm.upload_all()
            swarm.run_until(lambda: swarm.acked == n, timeout)
            log(f"{kind} x {n}: {swarm.acked} updates queued for the offline server")
        log(f"{kind} x {n}: {swarm.connected} devices connected; starting the server")
        began = time.monotonic()
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, json.dumps(config)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        swarm.run_until(lambda: server.poll() is not None, timeout + 120)
        out, _ = server.communicate(timeout=60)
        wall = time.monotonic() - began
        sent, acked, connected = swarm.sent, swarm.acked, swarm.connected
        swarm.close()
        for worker in crew:
            worker.terminate()
        shares = [int(w.communicate(timeout=60)[0].split()[-1]) for w in crew]
    result = json.loads(out.strip().splitlines()[-1])
    row = {
        "kind": kind,
        "mode": "backlog" if backlog else "live",
        "broker_save_every_s": save_every_s,
        "devices": n,
        "workers": workers,
        "worker_shares": shares,
        "database": database.split(":", 1)[0] if database else "sqlite",
        "connected": connected,
        "update_bytes": size,
        "sent": sent,
        "acked_by_broker": acked,
        "accepted": result["accepted"],
        "lost": acked - result["accepted"],
        "round_s": result["seconds"],
        "updates_per_s": result["accepted"] / result["seconds"],
        "ingest_s": result["ingest_s"],  # first to last accepted update (workers: claimed)
        "ingest_per_s": result["accepted"] / result["ingest_s"] if result["ingest_s"] else None,
        "rss_server_mb": result["rss_mb"],
        "wall_s": wall,
    }
    log(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument(
        "--runs", default="zo:1000,dense:1000,zo:10000,zo:1000:backlog,dense:1000:backlog"
    )
    parser.add_argument("--zo-pairs", type=int, default=100, help="seed pairs per ZO update")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workers", type=int, default=0, help="aggregator worker processes")
    parser.add_argument("--postgres", action="store_true", help="the registry on PostgreSQL")
    parser.add_argument(
        "--broker-save-every-s",
        type=int,
        default=0,
        help="mosquitto saves its database every N seconds (0: on every change)",
    )
    args = parser.parse_args()
    rows = []
    with contextlib.ExitStack() as stack:
        database = ""
        if args.postgres:
            postgres = stack.enter_context(PostgresServer())
        for i, spec in enumerate(args.runs.split(",")):
            kind, n, *mode = spec.split(":")
            if args.postgres:
                database = postgres.create_database(f"load{i}")
            rows.append(
                one_run(
                    kind,
                    int(n),
                    args.zo_pairs,
                    args.timeout,
                    args.workers,
                    database,
                    backlog=mode == ["backlog"],
                    save_every_s=args.broker_save_every_s,
                )
            )
    doc: dict = {
        "runs": rows,
        "machine": platform.processor() or platform.machine(),
        "broker_save_every_s": args.broker_save_every_s,
    }
    for row in rows:  # the server's rate from backlog runs; round latency from live ones
        key = f"updates_per_s_{row['kind']}" + ("" if row["mode"] == "backlog" else "_live")
        doc[key] = max(doc.get(key, 0), row["updates_per_s"])
        if row["mode"] == "live":
            doc[f"round_s_{row['devices']}"] = max(
                doc.get(f"round_s_{row['devices']}", 0), row["round_s"]
            )
    doc["rss_server_mb"] = max(r["rss_server_mb"] for r in rows)
    doc["lost"] = sum(r["lost"] for r in rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
