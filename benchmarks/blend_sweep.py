"""The canary's ``[tuning] blend`` swept on the 12 clients the personalization report does not
score (``personalization.py --scored sweep``; the report's 12 join the fleet as bystanders), one
seed, otherwise the report's fleet and schedule (``REPORT``: 6 rounds x 5 AdamW steps, k = 5
cluster adapters moved by 2x, devices assigned by validation loss).

Each value runs ``personalization.py --federations personal --blend V`` in its own process
(1 thread, ``--jobs`` at a time; about an hour each with a core to itself: 58 min measured), and
local-only runs once as the reference. Per value: the served adapter's geometric mean over the
clients, per kind and over all, its ratio to local-only, its worst client against local-only,
on how many clients it beats the first value (0: no blend; same batch draws, so paired), and
what the canaries served. The pick is the value with the lowest geometric mean over all 12.

    python -m benchmarks.blend_sweep --json results/sweep_blend.json
    python -m benchmarks.blend_sweep --json results/sweep_blend.json \
        --from-rows 0=results/a.jsonl 0.5=results/b.jsonl --local results/a.jsonl
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import geomean, log, save_plot, sweep_parser
from benchmarks.personalization import kinds_of

# the report's command line (README, "Personalization on users who differ") less --blend
REPORT = shlex.split(
    "--clusters 5 --cluster-step 2 --cluster-assign loss --bystanders --rounds 6 --steps 5"
)


def value_rows(spec: str) -> tuple[float, str]:
    """``--from-rows VALUE=ROWS``: a blend value and the rows file of its run."""
    value, sep, path = spec.partition("=")
    try:
        if sep and path:
            return float(value), path
    except ValueError:
        pass
    raise SystemExit(f"--from-rows takes VALUE=ROWS (e.g. 0.5=results/b.jsonl), got {spec!r}")


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def run(args) -> tuple[dict[float, list[dict]], list[dict]]:
    """Run each value and local-only, ``args.jobs`` processes at a time; their rows."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*REPORT, "--scored", "sweep", "--seeds", str(args.seed), "--lr", str(args.lr)]
    common += ["--mixed", args.mixed] if args.mixed else []
    arms = {v: ["--federations", "personal", "--blend", str(v)] for v in args.values}
    arms["local"] = ["--federations", "local"]
    pending, running = list(arms), []
    while pending or running:
        while pending and len(running) < args.jobs:
            arm = pending.pop(0)
            stem = out / f"blend{arm}" if arm != "local" else out / "local"
            command = [sys.executable, "-m", "benchmarks.personalization", *common, *arms[arm]]
            command += ["--rows", f"{stem}.jsonl", "--json", f"{stem}.json"]
            with open(f"{stem}.log", "w") as sink:
                running.append((arm, stem, subprocess.Popen(command, stderr=sink)))
            log(f"blend sweep: started {arm} (log {stem}.log)")
        arm, stem, proc = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"blend sweep: the {arm} run failed; see {stem}.log")
        log(f"blend sweep: {arm} done")
    rows = {v: read_rows(str(out / f"blend{v}.jsonl")) for v in args.values}
    return rows, read_rows(str(out / "local.jsonl"))


def summarize(by_value: dict[float, list[dict]], local: list[dict]) -> dict:
    """Per value and kind (and ``all``): the served geometric mean, its ratio to local-only,
    the worst client's ratio, wins over the first value, and what was served; the pick."""
    reference = {key(r): r["ppl_local"] for r in local if "ppl_local" in r}
    first = {key(r): r["ppl_served"] for r in next(iter(by_value.values()))}
    out: dict = {"values": {}}
    for value, rows in by_value.items():
        if missing := {key(r) for r in rows} - set(reference):
            raise SystemExit(f"blend {value}: no local-only row for {sorted(missing)}")
        kinds = {"all": rows} | {k: [r for r in rows if r["kind"] == k] for k in kinds_of(rows)}
        out["values"][str(value)] = {
            kind: {
                "ppl_served": geomean([r["ppl_served"] for r in some]),
                "ppl_local": geomean([reference[key(r)] for r in some]),
                "served_over_local": geomean([r["ppl_served"] / reference[key(r)] for r in some]),
                "worst_served_over_local": max(r["ppl_served"] / reference[key(r)] for r in some),
                "better_than_first": sum(r["ppl_served"] < first[key(r)] for r in some),
                "clients": len(some),
                "served_counts": dict(
                    sorted(Counter(r["served"].split(":")[0] for r in some).items())
                ),
            }
            for kind, some in kinds.items()
        }
    out["pick"] = min(out["values"], key=lambda v: out["values"][v]["all"]["ppl_served"])
    return out


def key(row: dict) -> tuple[int, str]:
    return row["seed"], row["client"]


def plot(summary: dict, seeds: list[int], path: Path) -> None:
    """Served over local-only against the blend value, per kind and over all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(summary["values"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in summary["values"][values[0]]:
        ratios = [summary["values"][v][kind]["served_over_local"] for v in values]
        ax.plot([float(v) for v in values], ratios, marker="o", label=kind)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("[tuning] blend")
    ax.set_ylabel("served / local-only (geometric mean)")
    clients = summary["values"][values[0]]["all"]["clients"]
    seed = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    title = f"the canary's blend, {clients} sweep clients, {seed}"
    ax.set_title(title, fontsize=9)
    save_plot(fig, ax, path)


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--values", default="0,0.25,0.5,0.75", help="blend values, 0 first")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (1 per core)")
    parser.add_argument("--out", default="results/sweep_blend", help="each run's rows and log")
    parser.add_argument("--from-rows", nargs="+", metavar="VALUE=ROWS", help="earlier runs")
    parser.add_argument("--local", help="with --from-rows: rows that hold ppl_local")
    args = parser.parse_args()
    if args.from_rows:
        if not args.local:
            raise SystemExit("--from-rows needs --local ROWS: the local-only reference")
        by_value = {v: read_rows(p) for v, p in map(value_rows, args.from_rows)}
        local = read_rows(args.local)
    else:
        args.values = [float(v) for v in args.values.split(",")]
        by_value, local = run(args)
    summary = summarize(dict(sorted(by_value.items())), local)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for rows in by_value.values() for r in rows})
    path.write_text(json.dumps({"seeds": seeds, "report": REPORT, **summary}, indent=2))
    plot(summary, seeds, path.with_suffix(".png"))
    for value, kinds in summary["values"].items():
        ratios = ", ".join(f"{k} {s['served_over_local']:.3f}x" for k, s in kinds.items())
        wins = f"{kinds['all']['better_than_first']}/{kinds['all']['clients']}"
        log(f"blend {value}: served/local-only {ratios}; better than the first on {wins}")
    log(f"blend sweep: pick {summary['pick']} (results in {path})")


if __name__ == "__main__":
    main()
