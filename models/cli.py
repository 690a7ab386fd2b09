"""``fleetune export onnx|gguf|hf`` (device bundles, or a LoRA adapter as a GGUF) and
``fleetune base`` (prepare a base and print its manifest). Needs the torch extra."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetune.edge_sdk.errors import ConfigError


def _export(args: argparse.Namespace) -> int:
    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.models.base import prepare_base

    base = prepare_base(args.base)
    if args.adapter:
        if args.format != "gguf":
            raise ConfigError("--adapter converts a LoRA adapter for llama.cpp: use `export gguf`")
        return _export_lora_gguf(args, base)
    if args.format == "gguf":
        from fleetune.models.gguf_export import export_gguf_bundle

        print(export_gguf_bundle(base, args.quant, args.out))
    elif args.format == "hf":
        from fleetune.models.base import export_hf_bundle

        print(export_hf_bundle(base, args.out))
    else:
        from fleetune.models.onnx import export_onnx

        targets = tuple(args.targets.split(","))
        spec = LoraSpec(r=args.r, alpha=args.alpha, targets=targets, window=args.window)
        print(export_onnx(base, spec, out_dir=args.out, force=args.force))
    return 0


def _export_lora_gguf(args: argparse.Namespace, base) -> int:
    """``export gguf --adapter DIR``: a fleetune (PEFT-format) adapter directory -> a GGUF LoRA
    that stock llama.cpp loads with ``--lora``."""
    from fleetune.edge_sdk.adapters.lora import load_peft
    from fleetune.edge_sdk.adapters.lora.gguf import write_lora_gguf

    tensors, spec = load_peft(args.adapter, base)  # names a bad adapter or another base's
    path = Path(args.out) if args.out else Path(args.adapter) / "adapter_model.gguf"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(write_lora_gguf(tensors, spec, base, path))
    except OSError as err:
        raise ConfigError(f"cannot write the GGUF adapter {path}: {err}") from err
    return 0


def _base(args: argparse.Namespace) -> int:
    from fleetune.models.base import prepare_base

    print(prepare_base(args.name).to_json())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a device bundle for an engine")
    export.add_argument("format", choices=("onnx", "gguf", "hf"), help="hf: for the torch engine")
    export.add_argument(
        "--quant",
        default="q8_0",
        choices=("q8_0", "q4_0", "q4_1", "f16"),
        help="gguf: base weight type",
    )
    export.add_argument("--base", default="smollm2-135m", help="named base or HF checkpoint dir")
    export.add_argument("--r", type=int, default=8, help="onnx: LoRA rank of the adapter input")
    export.add_argument("--alpha", type=float, default=16.0)
    export.add_argument("--targets", default="q_proj,v_proj")
    export.add_argument(
        "--window",
        type=int,
        default=0,
        help="onnx: LoRA on the top K layers only, with the prefix and window graphs (0: all)",
    )
    export.add_argument(
        "--adapter",
        metavar="DIR",
        help="gguf: convert this LoRA adapter (adapter_config.json + adapter_model.safetensors, "
        "tuned on --base) to a GGUF LoRA for llama.cpp --lora, instead of exporting the base",
    )
    export.add_argument(
        "--out",
        help="the bundle directory (default: <cache>/bundles/<base>/<format>..., where devices "
        "on this machine look); with --adapter, the GGUF file (default: DIR/adapter_model.gguf)",
    )
    export.add_argument("--force", action="store_true", help="onnx: export again even if present")
    export.set_defaults(func=_export)

    base = sub.add_parser("base", help="prepare a base model and print its manifest")
    base.add_argument("name", nargs="?", default="smollm2-135m")
    base.set_defaults(func=_base)
