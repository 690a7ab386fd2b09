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


def register(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("server", help="run aggregation rounds for a fleet")
    srv.add_argument("--config", help="TOML file with a [server] table")
    srv.add_argument("--embedded-broker", action="store_true", help="start amqtt in-process")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--rounds", type=int)
    srv.add_argument("--quorum", type=int)
    srv.add_argument("--fleet")
    srv.add_argument("--base", help="a device bundle dir, a named base or an HF checkpoint dir")
    srv.set_defaults(func=_server)
