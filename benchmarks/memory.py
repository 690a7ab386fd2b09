"""Peak RSS of a tuning step per engine and tuner, and the fit ``edge_sdk/memory.py`` plans with.

Each point is a fresh interpreter (1 thread) that opens the engine on SmolLM2-135M (LoRA r 8 on
q,v; a window of the top ``--window`` layers where the arm has one), builds the prefix cache of
64 training windows in RAM where it needs one, and runs 3 steps of ``batch x seq`` tokens; its
peak is VmHWM. Per arm, ``fixed + tokens x per_token`` is fitted through two points (batch 1 and
``--batch-hi`` at ``--seq`` tokens) and checked at a third it was not fitted on (``--check``):
``error_pct`` is that prediction's error. ``runtime_mb``: a fresh interpreter that only imports
the engine (torch with a window: the lean engine, plain torch); ``weights_mb = fixed -
runtime``. ``edge_sdk/memory.py`` holds the fitted numbers. The llama.cpp arms decode a row at a
time, so their peak follows the sequence length rather than batch x length: they are fitted
through 1 x ``--seq`` and 1 x 3``--seq`` tokens (``per_row``) and checked at the same point.

    python -m benchmarks.memory --json results/bench_memory.json
    python -m benchmarks.memory --arms torch:fp32:zo:0 --json /tmp/m.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import peak_rss_mb  # noqa: E402

ARMS = (
    "torch:fp32:backprop:0",
    "torch:fp32:backprop:4",
    "torch:bf16:backprop:4",
    "torch:int8:backprop:4",
    "torch:int4:backprop:4",
    "torch:fp32:zo:0",
    "torch:fp32:zo:4",
    "onnx:fp32:zo:0",
    "onnx:int8:zo:0",
    "onnx:fp32:zo:4",
    "onnx:int8:zo:4",
    "llamacpp:q8_0:zo:0",
    "llamacpp:q8_0:zo:4",
    "llamacpp:q4_0:zo:0",
    "llamacpp:q4_0:zo:4",
)

CHILD = """
import sys, numpy as np
engine, precision, tuner, window, batch, seq, bundle = sys.argv[1:8]
window, batch, seq = int(window), int(batch), int(seq)
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop, window_zo
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune
from fleetune.models.base import prepare_base
base, spec = prepare_base("smollm2-135m"), LoraSpec(window=window)
if engine == "torch" and window:  # what a device under a budget opens: the lean window engine
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    backend = TorchWindowBackend(base, spec, 1, precision, recompute=True)
elif engine == "torch":
    import torch
    torch.set_num_threads(1)
    from fleetune.edge_sdk.backends.torch import TorchBackend
    backend = TorchBackend(base, spec)
elif engine == "llamacpp":  # `bundle`: the base's GGUF; a window: its window engine
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.backends.llamacpp_window import LlamaCppWindowBackend
    kind = LlamaCppWindowBackend if window else LlamaCppBackend
    backend = kind(bundle, base, spec, 1, max(512, seq))  # a device's n_ctx: 512
else:
    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    backend = OnnxBackend(bundle, precision=precision)
ids = np.random.default_rng(0).integers(0, base.vocab_size, size=(64, seq))
cache = build_cache(backend, ids) if window else None
if tuner == "backprop" and window:
    window_backprop(backend, cache, 3, 1e-3, batch, 0)
elif tuner == "backprop":
    from fleetune.edge_sdk.tuners.backprop import tune_backprop
    tune_backprop(backend, ids, 3, 1e-3, batch, 0)
else:
    theta = backend.layout.flatten(init_lora(spec, base))
    tuned, rng = backend.layout.indices("lora_b"), np.random.default_rng(0)
    if window:
        window_zo(backend, cache, theta, tuned, 3, ZOConfig(), rng, batch)
    else:
        zo_tune(lambda th, s: backend.loss_flat(ids[:batch], th), theta, tuned, 3, ZOConfig(), rng)
"""

RUNTIME_CHILD = {  # what importing the engine costs
    "torch": "from fleetune.edge_sdk.backends.torch import TorchBackend\nimport peft",
    "torch-window": "from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend",
    "onnx": "from fleetune.edge_sdk.backends.onnx import OnnxBackend",
    "llamacpp": "from fleetune.edge_sdk.backends.llamacpp import init_llama\ninit_llama()",
}


def runtime(arm: str) -> str:
    """The :data:`RUNTIME_CHILD` an arm's engine is: torch with a window is the lean engine."""
    engine, _, _, window = arm.split(":")
    return "torch-window" if engine == "torch" and int(window) else engine


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(arm: str, batch: int, seq: int, bundles: dict) -> float:
    engine, precision, tuner, window = arm.split(":")
    bundle = bundles.get(int(window) if engine == "onnx" else precision, "")
    return peak_rss_mb(CHILD, engine, precision, tuner, window, str(batch), str(seq), bundle)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--arms", default=",".join(ARMS), help="engine:precision:tuner:window")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-hi", type=int, default=8)
    parser.add_argument("--check", default="2x128", help="batch x seq, not fitted on")
    args = parser.parse_args()

    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.models.base import prepare_base
    from fleetune.models.gguf_export import export_base_gguf
    from fleetune.models.onnx import export_onnx

    base = prepare_base("smollm2-135m")
    arms = args.arms.split(",")
    windows = {int(a.split(":")[3]) for a in arms if a.startswith("onnx:")}
    bundles: dict = {w: str(export_onnx(base, LoraSpec(window=w))) for w in sorted(windows)}
    for quant in {a.split(":")[1] for a in arms if a.startswith("llamacpp:")}:
        bundles[quant] = str(export_base_gguf(base, quant))  # exported here, not in the child
    check_batch, check_seq = (int(x) for x in args.check.split("x"))
    doc: dict = {
        "benchmark": "memory",
        "model": "SmolLM2-135M-Instruct",
        "lora": {"r": 8, "targets": ["q_proj", "v_proj"]},
        "cache_windows": 64,
        "arms": {},
        "runtime_mb": {e: peak_rss_mb(RUNTIME_CHILD[e]) for e in sorted(set(map(runtime, arms)))},
    }
    log(f"runtime: {doc['runtime_mb']}")
    for i, arm in enumerate(arms):
        began = time.monotonic()
        per_row = arm.startswith("llamacpp:")  # a row per decode: the row's length counts
        hi_batch, hi_seq = (1, 3 * args.seq) if per_row else (args.batch_hi, args.seq)
        lo = measure(arm, 1, args.seq, bundles)
        hi = measure(arm, hi_batch, hi_seq, bundles)
        per_token = (hi - lo) / (hi_batch * hi_seq - args.seq)
        fixed = lo - per_token * args.seq
        predicted = fixed + per_token * (check_seq if per_row else check_batch * check_seq)
        measured = measure(arm, check_batch, check_seq, bundles)
        doc["arms"][arm] = {
            "per_row": per_row,
            "peak_mb": {
                f"1x{args.seq}": lo,
                f"{hi_batch}x{hi_seq}": hi,
                args.check: measured,
            },
            "fixed_mb": fixed,
            "weights_mb": fixed - doc["runtime_mb"][runtime(arm)],
            "per_token_mb": per_token,
            "check_predicted_mb": predicted,
            "error_pct": 100 * (predicted - measured) / measured,
        }
        log(
            f"[{i + 1}/{len(arms)}] {arm}: fixed {fixed:.0f} MB + {1024 * per_token:.0f} KB/token; "
            f"{args.check}: {predicted:.0f} predicted, {measured:.0f} measured "
            f"({time.monotonic() - began:.0f} s)"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
