"""``fleetune server``: run aggregation rounds for a fleet."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from fleetune.edge_sdk.bundle import BUNDLE_MANIFEST, Bundle
from fleetune.edge_sdk.manifest import BaseManifest


def resolve_base(name: str) -> BaseManifest:
    """A device bundle's base (its manifest is all the server needs), else a named base or
    Hugging Face checkpoint resolved by the model toolchain."""
    if (Path(name) / BUNDLE_MANIFEST).exists():
        return Bundle.load(name).base
    from fleetune.models.base import prepare_base

    return prepare_base(name)


def _server(args: argparse.Namespace) -> int:
    from fleetune.server.app import FleetServer
    from fleetune.server.config import ServerConfig, load_server_config

    config = load_server_config(args.config) if args.config else ServerConfig()
    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("rounds", args.rounds),
            ("quorum", args.quorum),
            ("fleet", args.fleet),
            ("base", args.base),
        )
        if v is not None
    }
    config = replace(config, **overrides)
    if args.worker:
        return _worker(config, args.worker)
    embedded = None
    if args.embedded_broker:
        from fleetune.server.broker import EmbeddedBroker

        embedded = EmbeddedBroker(config.host, config.port).__enter__()
    server = FleetServer(config, resolve_base(config.base))
    try:
        results = server.run()
    finally:
        server.close()
        if embedded is not None:
            embedded.close()
    print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    return 0


def _worker(config, name: str) -> int:
    """An aggregator worker (server/workers.py) until SIGINT or SIGTERM."""
    import signal
    import threading

    from fleetune.server.workers import AggregatorWorker

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker = AggregatorWorker(config, resolve_base(config.base), name)
    worker.run(stop)
    print(json.dumps({"worker": name, "accepted": worker.accepted}))
    return 0


def _provision(args: argparse.Namespace) -> int:
    from fleetune.server.provision import provision

    devices = [d for d in args.devices.split(",") if d]
    done = provision(
        args.out, args.fleet, devices, args.host, args.port, args.days, args.broker_save_every_s
    )
    print(
        json.dumps(
            {
                "fleet": done.fleet,
                "folder": str(done.root),
                "added": done.added,
                "devices": done.devices,
                "fleet_key": done.fleet_key,
                "broker": f"mosquitto -c {done.root / 'broker' / 'mosquitto.conf'}",
                "server": f"fleetune server --config {done.root / 'server' / 'server.toml'}",
                "device": "fleetune device --config devices/<id>/device.toml",
            },
            indent=2,
        )
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from fleetune.server.provision import rotate_key

    public, version = rotate_key(args.signing_key, drop_old=args.drop_old)
    print(json.dumps({"fleet_key": public, "key_list_version": version}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="provision a fleet's credentials; rotate its key")
    steps = fleet.add_subparsers(dest="step", required=True)
    prov = steps.add_parser(
        "provision",
        help="CA, TLS certificates, mosquitto config + ACL, signing key, one folder per device",
    )
    prov.add_argument("--out", required=True, help="the fleet's folder (created or extended)")
    prov.add_argument("--fleet", required=True)
    prov.add_argument("--devices", required=True, help="comma-separated device ids")
    prov.add_argument("--host", default="127.0.0.1", help="the broker's address devices use")
    prov.add_argument("--port", type=int, default=8883)
    prov.add_argument("--days", type=int, default=3650, help="certificate lifetime")
    prov.add_argument(
        "--broker-save-every-s",
        type=int,
        default=0,
        help="mosquitto saves retained and queued messages every N seconds instead of on every "
        "change (0): much faster past ~1,000 devices; a broker crash loses the last N seconds",
    )
    prov.set_defaults(func=_provision)
    rot = steps.add_parser(
        "rotate-key", help="a new signing key, announced to devices under the old one"
    )
    rot.add_argument("--signing-key", required=True, help="the server's signing-key.pem")
    rot.add_argument("--drop-old", action="store_true", help="stop trusting the old key")
    rot.set_defaults(func=_rotate)

    srv = sub.add_parser("server", help="run aggregation rounds for a fleet")
    srv.add_argument("--config", help="TOML file with a [server] table")
    srv.add_argument("--embedded-broker", action="store_true", help="start amqtt in-process")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--rounds", type=int)
    srv.add_argument("--quorum", type=int)
    srv.add_argument("--fleet")
    srv.add_argument("--base", help="a device bundle dir, a named base or an HF checkpoint dir")
    srv.add_argument(
        "--worker", metavar="NAME", help="run as aggregator worker NAME ([server] workers)"
    )
    srv.set_defaults(func=_server)
