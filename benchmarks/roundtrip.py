"""Wire cost of one device update for the default adapter (LoRA r=8 on q,v of SmolLM2-135M):
bytes, encode/decode time and reconstruction error per encoding, as ratios against f32 measured
in the same process. No model weights are needed: the shapes come from the architecture."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.edge_sdk.protocol import Fleet, Update

DENSE = ("f32", "f16", "q8")  # the dense encodings (the fourth, "seeds", is for ZO runs)

SMOLLM2 = BaseManifest(
    name="smollm2-135m",
    sha256="0" * 64,
    architecture="llama",
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
)


def measure(encoding: str, delta: dict, repeats: int = 5) -> dict:
    fleet = Fleet(SMOLLM2, LoraSpec())
    update = Update("bench", 1, 0, 1, delta=delta)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        data = update.encode(fleet, encoding)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = Update.decode(data, fleet).delta or {}
        dec.append(time.perf_counter() - t)
    err = max(float(np.abs(out[k] - v).max() / (np.abs(v).max() + 1e-12)) for k, v in delta.items())
    return {
        "bytes": len(data),
        "encode_ms": 1e3 * float(np.median(enc)),
        "decode_ms": 1e3 * float(np.median(dec)),
        "max_rel_error": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default="results/bench_roundtrip.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # a realistic delta: small values (1e-3 scale) with heavier tails
    delta = {
        name: (rng.standard_t(4, size=shape) * 1e-3).astype(np.float32)
        for name, shape in LoraSpec().layout(SMOLLM2)
    }
    results = {e: measure(e, delta) for e in DENSE}
    for e in DENSE:
        results[e]["bytes_ratio_vs_f32"] = results[e]["bytes"] / results["f32"]["bytes"]
    doc = {
        "benchmark": "roundtrip",
        "params": LoraSpec().num_params(SMOLLM2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "encodings": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
