"""The ``fleetune`` command's front door: each package owns its commands, this only dispatches.

``demo`` (fleetune.sim) · ``server`` (fleetune.server) · ``device`` (fleetune.edge_sdk) ·
``fleet provision``, ``fleet rotate-key`` (fleetune.server) · ``export``, ``base`` (fleetune.models)
"""

from __future__ import annotations

import argparse
import logging
import sys

from fleetune.edge_sdk import cli as device_cli
from fleetune.edge_sdk.errors import FleetuneError
from fleetune.models import cli as models_cli
from fleetune.server import cli as server_cli
from fleetune.sim import cli as sim_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for package in (sim_cli, server_cli, device_cli, models_cli):
        package.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args))
    except FleetuneError as err:
        print(f"fleetune: error: {err}", file=sys.stderr)
        return 2
