"""``fleetune device``: run one device until the server ends the rounds. Needs only the device
extras (``fleetune[onnx]`` or ``fleetune[llamacpp]``) and a bundle."""

from __future__ import annotations

import argparse
import json


def _device(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import FleetuneConfig, load_config
    from fleetune.edge_sdk.data import load_corpus, pick_clients

    config = load_config(args.config) if args.config else FleetuneConfig()
    if args.bundle:
        config = replace(config, device=replace(config.device, bundle=args.bundle))
    item = pick_clients(load_corpus(args.data), 1, names=(args.client,) if args.client else ())[0]
    with EdgeClient(config) as client:
        report = client.run(item)
    print(json.dumps(report.__dict__, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("device", help="run one device until the server ends the rounds")
    dev.add_argument("--config", help="TOML file with [device], [tuning], [sync] tables")
    dev.add_argument("--bundle", help="device bundle dir (overrides [device] bundle)")
    dev.add_argument("--data", help="corpus (default: Shakespeare)")
    dev.add_argument("--client", help="client of the corpus (default: the largest)")
    dev.set_defaults(func=_device)
