"""The ONNX device bundle: loss graphs (fp32, weight-only int8), the KV-cache decoder graph, the
tokenizer and ``fleetune-bundle.json``. Only missing graphs are built."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.bundle import Bundle, default_bundle_dir
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

log = logging.getLogger(__name__)
GRAPH_FILES = {
    "fp32": "loss_fp32.onnx",
    "int8": "loss_int8.onnx",
    "decoder": "decoder_fp32.onnx",
    "prefix_fp32": "prefix_fp32.onnx",  # a layer window's adapter only (LoraSpec.window)
    "window_fp32": "window_fp32.onnx",
    "prefix_int8": "prefix_int8.onnx",
    "window_int8": "window_int8.onnx",
}
INT8 = "int8 weight-only (MatMulNBits)"
QUANTIZATION = {g: INT8 if g.endswith("int8") else "fp32" for g in GRAPH_FILES}
WINDOW_GRAPHS = ("prefix_fp32", "window_fp32", "prefix_int8", "window_int8")


def _built(root: Path, base: BaseManifest, spec: LoraSpec) -> dict[str, str]:
    """The graphs an earlier export of the same base and spec left in ``root``."""
    try:
        previous = Bundle.load(root, "onnx")
    except ConfigError as err:
        if (root / "fleetune-bundle.json").exists():  # malformed: export every graph again
            log.warning("ignoring %s: exporting every graph again", err)
        return {}
    if previous.base.sha256 != base.sha256 or previous.adapter != spec:
        return {}
    return {g: f for g, f in previous.files.items() if (root / f).exists()}


def export_onnx(
    base: BaseManifest,
    spec: LoraSpec,
    out_dir: str | os.PathLike[str] | None = None,
    graphs: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Write the ONNX bundle for ``base`` + ``spec`` into ``out_dir`` (default:
    :func:`~fleetune.edge_sdk.bundle.default_bundle_dir`); returns its directory. ``graphs``
    are roles of ``GRAPH_FILES``; by default the loss graphs and the decoder, or for an adapter
    on a layer window the decoder and the prefix and window graphs (a window engine scores
    through those and never loads a full loss graph)."""
    from fleetune.models.onnx.graphs import (
        export_decoder_graph,
        export_loss_graph,
        export_window_graphs,
    )
    from fleetune.models.onnx.quantize import quantize_int8

    if graphs is None:
        graphs = ("decoder", *WINDOW_GRAPHS) if spec.window else ("fp32", "int8", "decoder")
    unknown = sorted(set(graphs) - set(GRAPH_FILES))
    if unknown or (not spec.window and set(graphs) & set(WINDOW_GRAPHS)):
        raise ConfigError(
            f"ONNX graphs {sorted(graphs)}: known are {sorted(GRAPH_FILES)}, the prefix and "
            "window graphs only for an adapter with lora_window = K"
        )
    root = Path(out_dir) if out_dir else default_bundle_dir(base.name, "onnx", spec)
    done = {} if force else _built(root, base, spec)
    missing = [g for g in graphs if g not in done]
    if not missing:
        return root
    if not base.hf_dir:
        raise ConfigError(f"base {base.name} has no Hugging Face copy to export from")
    root.mkdir(parents=True, exist_ok=True)
    layout = FlatLayout(spec, base)
    start = time.monotonic()
    if "fp32" in missing or ("int8" in missing and "fp32" not in done):
        log.info("exporting the %s loss graph, adapter input of %d values", base.name, layout.size)
        export_loss_graph(base.hf_dir, root / GRAPH_FILES["fp32"], layout)
        done["fp32"] = GRAPH_FILES["fp32"]
    if "int8" in missing:
        log.info("quantizing the base weights to int8 (weight-only; the adapter path stays fp32)")
        quantize_int8(root / GRAPH_FILES["fp32"], root / GRAPH_FILES["int8"])
        done["int8"] = GRAPH_FILES["int8"]
    if "decoder" in missing:
        log.info("exporting the KV-cache decoder graph for generation")
        export_decoder_graph(base.hf_dir, root / GRAPH_FILES["decoder"], layout)
        done["decoder"] = GRAPH_FILES["decoder"]
    if {"prefix_fp32", "window_fp32"} & set(missing) or (
        {"prefix_int8", "window_int8"} & set(missing) and "window_fp32" not in done
    ):
        log.info("exporting the prefix and window graphs of the top %d layers", spec.window)
        export_window_graphs(
            base.hf_dir,
            root / GRAPH_FILES["prefix_fp32"],
            root / GRAPH_FILES["window_fp32"],
            layout,
        )
        done.update({g: GRAPH_FILES[g] for g in ("prefix_fp32", "window_fp32")})
    for graph in ("prefix", "window"):
        if f"{graph}_int8" in missing:
            quantize_int8(root / GRAPH_FILES[f"{graph}_fp32"], root / GRAPH_FILES[f"{graph}_int8"])
            done[f"{graph}_int8"] = GRAPH_FILES[f"{graph}_int8"]
    shutil.copy(Path(base.hf_dir) / "tokenizer.json", root / "tokenizer.json")
    Bundle(
        root=root,
        format="onnx",
        base=base,
        files=done,
        quantization={g: QUANTIZATION[g] for g in done},
        adapter=spec,
        layout=layout.entries,
        eos_token_id=eos_token_id(base.hf_dir),
    ).write()
    log.info("ONNX bundle in %s (%.0f s)", root, time.monotonic() - start)
    return root


def eos_token_id(hf_dir: str) -> int | None:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    eos = config.get("eos_token_id")
    return int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None
