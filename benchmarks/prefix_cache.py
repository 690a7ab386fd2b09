"""A large local dataset's prefix cache in RAM or on disk: peak RSS, build time, step time.

What a window device under a memory budget does with a cache larger than the budget leaves it
(``LocalTuner.prefix_cache``): each arm is a fresh interpreter (1 thread) that opens the lean
torch window engine as such a device does (bf16, layers recomputed for backprop, window 4 of
SmolLM2-135M's 30), builds the cache of ``--rows`` windows of 64 tokens (random tokens: the
cost does not depend on the text) in RAM or in a file (written a chunk of rows at a time, read
back a step's rows at a time), then runs ``--steps`` AdamW steps of 4 windows from it. Keys:
``rss_{ram,disk}_mb`` (VmHWM), ``build_s_{ram,disk}``, ``step_ms_{ram,disk}`` (median, first
step excluded), ``cache_mb``.

    python -m benchmarks.prefix_cache --json results/bench_prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import peak_rss_mb  # noqa: E402

CHILD = """
import json, sys, time, numpy as np
rows, steps, where, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop
from fleetune.models.base import prepare_base
engine = TorchWindowBackend(prepare_base("smollm2-135m"), LoraSpec(window=4), 1, "bf16", True)
ids = np.random.default_rng(0).integers(0, 49152, size=(rows, 64))
path = None if where == "ram" else where
cache = build_cache(engine, ids, path)
times = []
def progress(step, loss):
    times.append(time.perf_counter())
began = time.perf_counter()
window_backprop(engine, cache, steps, 1e-3, 4, 0, progress=progress)
gaps = np.diff([began, *times])[1:]
json.dump({"build_s": cache.seconds, "step_ms": 1e3 * float(np.median(gaps)),
           "cache_mb": cache.nbytes / 2**20, "where": cache.where}, open(out, "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    doc: dict = {"rows": args.rows, "tokens": 64, "steps": args.steps, "window": 4}
    with tempfile.TemporaryDirectory(prefix="ft-cache-") as tmp:
        for arm in ("ram", "disk"):
            where = "ram" if arm == "ram" else str(Path(tmp) / "states.f32")
            out = Path(tmp) / f"{arm}.json"
            rss = peak_rss_mb(CHILD, str(args.rows), str(args.steps), where, str(out))
            got = json.loads(out.read_text())
            doc[f"rss_{arm}_mb"], doc[f"build_s_{arm}"] = rss, got["build_s"]
            doc[f"step_ms_{arm}"], doc["cache_mb"] = got["step_ms"], got["cache_mb"]
            print(f"{arm}: {rss:.0f} MB peak, {got}", file=sys.stderr, flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
