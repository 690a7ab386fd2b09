"""The persistent-cluster arm of ``benchmarks/personalization.py`` (IFCA, Ghosh et al., NeurIPS
2020) and the sweep of its schedule.

The server keeps K cluster adapters for the whole run (the ``cluster`` arm of the FedAvg
federation instead rebuilds them each round on top of the global). Round 1: every device tunes
S AdamW steps from the shared init; the server groups the changes by direction (k-means over
unit-norm deltas, ``server/clusters.py``) and each group's FedAvg becomes a cluster adapter.
Rounds 2..R: each device scores every cluster adapter on its validation windows, tunes S steps
from the best, and uploads the change; the server moves each cluster adapter by ``eta`` times
its members' FedAvg change (``eta`` > 1: a server step larger than the mean, since members of
a cluster pull the same way). A device's compute is the same R x S steps as every other arm
(R x S = the report's rounds x steps), plus the canary's forwards (K + 1 adapters a round).

  ifca          the cluster adapter the device picks by validation loss after round R
  ifca_served   what the device's canary serves: its own last tuning (the cluster adapter of
                round R - 1 plus its S steps) or a cluster adapter, whichever validates best

The sweep (``python -m benchmarks.cluster_fleet --json PATH``) picks R x S and eta on the 12
clients of ``mixture_fleet.SWEEP_CLIENTS`` (none in the report), 1 seed, against local-only
on the same clients:

    python -m benchmarks.cluster_fleet --json results/sweep_cluster.json --configs 3:10:1,6:5:2
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import geomean, log, sweep_parser  # noqa: E402
from fleetune.edge_sdk.canary import Canary  # noqa: E402
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.server.clusters import Clusters  # noqa: E402
from fleetune.server.strategy import STRATEGIES, Update  # noqa: E402

IFCA_METHODS = ("ifca", "ifca_served")


def val_loss(tb, tensors, windows) -> float:
    tb.set_adapter(tensors)
    return math.log(perplexity(tb, windows, 4))


def ifca_arms(tb, init, prepared: dict, seed: int, rounds: int, steps: int, args) -> dict:
    """Each client's adapter per IFCA method ({method: {client: tensors}}), with ``rounds`` x
    ``steps`` AdamW steps a device, ``args.clusters`` clusters and server step ``args.eta``;
    also {"cluster_of": {client: final pick}} for the report."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    fedavg, names = STRATEGIES["fedavg"](), list(prepared)

    def tune(start, name, round_):
        tb.set_adapter(start)
        i = names.index(name)
        data = prepared[name]["train"]
        tune_backprop(tb, data, steps, args.lr, 4, seed * 1000 + round_ * 100 + i)
        return tb.get_adapter()

    def update(name, start, after):
        delta = {k: after[k] - start[k] for k in start}
        return Update(name, len(prepared[name]["train"]), delta=delta)

    def pick(name, models):
        """IFCA: the cluster adapter with the lowest loss on the device's validation windows."""
        return min(models, key=lambda c: val_loss(tb, models[c], prepared[name]["val"]))

    # the server's persistent clusters, moved by eta x their members' FedAvg change; round 1
    # groups the changes by direction, later rounds take the devices' validation-loss picks
    clusters = Clusters(args.clusters, args.eta, fedavg, tb.layout)
    canaries = {n: Canary(lambda t, v=prepared[n]["val"]: val_loss(tb, t, v), init) for n in names}
    start = dict.fromkeys(names, init)
    labels: dict[str, int] | None = None
    for round_ in range(1, rounds + 1):
        began = time.monotonic()
        after = {n: tune(start[n], n, round_) for n in names}
        updates = [update(n, start[n], after[n]) for n in names]
        grouped = clusters.advance(init, updates, lambda s: {}, seed=1, assign=labels)
        labels = {n: c for n, (c, _) in grouped.items()}
        for n in names:
            canaries[n].offer({"local": after[n], "cluster": clusters.models[labels[n]]}, round_)
        log(f"seed {seed} ifca round {round_}: groups {labels} ({time.monotonic() - began:.0f} s)")
        labels = {n: pick(n, clusters.models) for n in names}
        # IFCA tunes from the picked cluster adapter; "served" from what the canary serves (its
        # own line or a cluster adapter, the product's default loop), its change added alike
        start = {
            n: canaries[n].served.tensors if args.follow == "served" else clusters.models[c]
            for n, c in labels.items()
        }
    return {
        "ifca": {n: clusters.models[c] for n, c in labels.items()},
        "ifca_served": {n: canaries[n].served.tensors for n in names},
        "cluster_of": labels,
        "served_of": {n: canaries[n].served.name for n in names},
    }


def main() -> None:
    from benchmarks.mixture_fleet import SWEEP_CLIENTS
    from benchmarks.personalization import clients, mixed_corpus, prepare

    parser = sweep_parser(__doc__)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--configs", default="3:10:1,3:10:2,6:5:2", help="rounds:steps:eta,...")
    parser.add_argument("--local", action="store_true", help="also local-only (30 steps)")
    parser.add_argument(
        "--follow",
        default="cluster",
        choices=("cluster", "served"),
        help="each round starts from the picked cluster adapter (IFCA) or what the canary serves",
    )
    args = parser.parse_args()
    from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.backprop import tune_backprop
    from fleetune.models.base import prepare_base

    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb, init = TorchBackend(base, spec), init_lora(spec, base)
    prepared = prepare(tb, clients(mixed_corpus(args.mixed), names=SWEEP_CLIENTS))
    rows = []

    def report(config: str, arms: dict) -> None:
        for n, data in prepared.items():
            tb.set_adapter(arms[n])
            ppl = perplexity(tb, data["heldout"], 4)
            rows.append({"config": config, "client": n, "kind": data["kind"], "ppl": ppl})
        log(f"{config}: {geomean([r['ppl'] for r in rows if r['config'] == config]):.2f}")
        table = {
            c: geomean([r["ppl"] for r in rows if r["config"] == c])
            for c in dict.fromkeys(r["config"] for r in rows)
        }
        doc = {"fleet": SWEEP_CLIENTS, "seed": args.seed, "table": table, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))

    if args.local:
        local = {}
        for i, n in enumerate(prepared):
            tb.set_adapter(init)
            tune_backprop(tb, prepared[n]["train"], 30, args.lr, 4, args.seed * 1000 + 999 - i)
            local[n] = tb.get_adapter()
        report("local", local)
    for config in args.configs.split(","):
        rounds, steps, eta = config.split(":")
        args.eta = float(eta)
        arms = ifca_arms(tb, init, prepared, args.seed, int(rounds), int(steps), args)
        for m in IFCA_METHODS:
            report(f"{m}@{config}" + ("/served" if args.follow == "served" else ""), arms[m])
    log(Path(args.json).read_text())


if __name__ == "__main__":
    main()
