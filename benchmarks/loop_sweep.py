"""One setting of the product's loop swept on the 12 clients the personalization report does not
score (``personalization.py --scored sweep``; the report's 12 join the fleet as bystanders), one
seed, otherwise the report's fleet (``FLEET``: k = 5 cluster adapters moved by 2x, devices
assigned by validation loss) and schedule (6 rounds x 5 AdamW steps):

- ``--sweep blend``: the canary's ``[tuning] blend`` (values ``0,0.25,0.5,0.75``, 0 first).
- ``--sweep schedule``: rounds x steps per round, ``R:S`` with R x S = 30, local-only's steps
  (values ``6:5,10:3``, the report's first), at ``--blend``. Every round also costs each device
  the canary's K + 3 validation passes, so more rounds cost more forwards: the summary gives them.

Each value runs ``personalization.py --federations personal`` in its own process (1 thread,
``--jobs`` at a time; about an hour each at 6 x 5 with a core to itself: 58 min measured), and
local-only runs once as the reference. Per value: the served adapter's geometric mean over the
clients, per kind and over all, its ratio to local-only, its worst client against local-only,
on how many clients it beats the first value (the same clients and seed, so paired), and
what the canaries served. The pick is the value with the lowest geometric mean over all 12.

    python -m benchmarks.loop_sweep --json results/sweep_blend.json
    python -m benchmarks.loop_sweep --sweep schedule --json results/sweep_schedule.json
    python -m benchmarks.loop_sweep --json results/sweep_blend.json \
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

# the report's command line (README, "Personalization on users who differ") less its schedule
# (--rounds 6 --steps 5) and --blend
FLEET = shlex.split("--clusters 5 --cluster-step 2 --cluster-assign loss --bystanders")
SCHEDULE, STEPS = "6:5", 30  # the report's rounds:steps; local-only's steps


def schedule(value: str) -> tuple[int, int]:
    """``R:S``: R rounds of S steps, R x S = local-only's steps (equal tuning compute)."""
    rounds, _, steps = value.partition(":")
    if not (rounds.isdigit() and steps.isdigit()) or int(rounds) * int(steps) != STEPS:
        raise SystemExit(f"a schedule is R:S with R x S = {STEPS}, got {value!r}")
    return int(rounds), int(steps)


def label(sweep: str, value: str) -> str:
    """A value as the summary names it (a blend as a float: ``0`` and ``0.0`` are one)."""
    if sweep == "schedule":
        return "{}:{}".format(*schedule(value))
    try:
        return str(float(value))
    except ValueError:
        raise SystemExit(f"a blend is a number, got {value!r}") from None


def arm_args(sweep: str, value: str, blend: float) -> list[str]:
    """The ``personalization.py`` options of one value's run."""
    rounds, steps = schedule(value if sweep == "schedule" else SCHEDULE)
    share = blend if sweep == "schedule" else float(value)
    return ["--rounds", str(rounds), "--steps", str(steps), "--blend", str(share)]


def value_rows(sweep: str, spec: str) -> tuple[str, str]:
    """``--from-rows VALUE=ROWS``: a value and the rows file of its run."""
    value, sep, path = spec.partition("=")
    if not (sep and path):
        raise SystemExit(f"--from-rows takes VALUE=ROWS (e.g. 0.5=results/b.jsonl), got {spec!r}")
    return label(sweep, value), path


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def run(args) -> tuple[dict[str, list[dict]], list[dict]]:
    """Run each value and local-only, ``args.jobs`` processes at a time; their rows."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*FLEET, "--scored", "sweep", "--seeds", str(args.seed), "--lr", str(args.lr)]
    common += ["--mixed", args.mixed] if args.mixed else []
    arms = {
        v: ["--federations", "personal", *arm_args(args.sweep, v, args.blend)] for v in args.values
    }
    arms["local"] = ["--federations", "local", *arm_args("schedule", SCHEDULE, 0.0)]
    stems = {a: out / (f"{args.sweep}{a.replace(':', 'x')}" if a != "local" else a) for a in arms}
    pending, running = list(arms), []
    while pending or running:
        while pending and len(running) < args.jobs:
            arm = pending.pop(0)
            stem = stems[arm]
            command = [sys.executable, "-m", "benchmarks.personalization", *common, *arms[arm]]
            command += ["--rows", f"{stem}.jsonl", "--json", f"{stem}.json"]
            with open(f"{stem}.log", "w") as sink:
                running.append((arm, stem, subprocess.Popen(command, stderr=sink)))
            log(f"{args.sweep} sweep: started {arm} (log {stem}.log)")
        arm, stem, proc = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"{args.sweep} sweep: the {arm} run failed; see {stem}.log")
        log(f"{args.sweep} sweep: {arm} done")
    rows = {arm: read_rows(f"{stem}.jsonl") for arm, stem in stems.items()}
    return {v: rows[v] for v in args.values}, rows["local"]


def validation_passes(rows: list[dict]) -> int | None:
    """Each device's canary passes over its validation windows in one run (``None`` for rows
    without their settings): per round its tuning, the global, the K cluster adapters with
    ``cluster_assign = "loss"`` (else its one), and the blend where it is on."""
    settings = rows[0].get("settings")
    if not settings:
        return None
    clusters = settings["clusters"] if settings["cluster_assign"] == "loss" else 1
    return settings["rounds"] * (2 + clusters + (settings["blend"] > 0))


def summarize(by_value: dict[str, list[dict]], local: list[dict]) -> dict:
    """Per value and kind (and ``all``): the served geometric mean, its ratio to local-only,
    the worst client's ratio, wins over the first value, and what was served; each value's
    validation passes per device; the pick."""
    reference = {key(r): r["ppl_local"] for r in local if "ppl_local" in r}
    first = {key(r): r["ppl_served"] for r in next(iter(by_value.values()))}
    out: dict = {"values": {}, "validation_passes": {}}
    for value, rows in by_value.items():
        if missing := {key(r) for r in rows} - set(reference):
            raise SystemExit(f"value {value}: no local-only row for {sorted(missing)}")
        kinds = {"all": rows} | {k: [r for r in rows if r["kind"] == k] for k in kinds_of(rows)}
        out["values"][value] = {
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
        out["validation_passes"][value] = validation_passes(rows)
    out["pick"] = min(out["values"], key=lambda v: out["values"][v]["all"]["ppl_served"])
    return out


def key(row: dict) -> tuple[int, str]:
    return row["seed"], row["client"]


def plot(summary: dict, sweep: str, seeds: list[int], path: Path) -> None:
    """Served over local-only for each value, per kind and over all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(summary["values"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind in summary["values"][values[0]]:
        ratios = [summary["values"][v][kind]["served_over_local"] for v in values]
        ax.plot(range(len(values)), ratios, marker="o", label=kind)
    ax.set_xticks(range(len(values)), values)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("[tuning] blend" if sweep == "blend" else "rounds:steps per round")
    ax.set_ylabel("served / local-only (geometric mean)")
    clients = summary["values"][values[0]]["all"]["clients"]
    seed = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    ax.set_title(f"the loop's {sweep}, {clients} sweep clients, {seed}", fontsize=9)
    save_plot(fig, ax, path)


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--sweep", choices=("blend", "schedule"), default="blend")
    parser.add_argument(
        "--values", help="blend: 0,0.25,0.5,0.75 (0 first); schedule: 6:5,10:3 (6:5 first)"
    )
    parser.add_argument("--blend", type=float, default=0.5, help="with --sweep schedule")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (1 per core)")
    parser.add_argument("--out", help="each run's rows and log (default: results/sweep_SWEEP)")
    parser.add_argument("--from-rows", nargs="+", metavar="VALUE=ROWS", help="earlier runs")
    parser.add_argument("--local", help="with --from-rows: rows that hold ppl_local")
    args = parser.parse_args()
    args.out = args.out or f"results/sweep_{args.sweep}"
    if args.from_rows:
        if not args.local:
            raise SystemExit("--from-rows needs --local ROWS: the local-only reference")
        by_value = {v: read_rows(p) for v, p in (value_rows(args.sweep, s) for s in args.from_rows)}
        local = read_rows(args.local)
    else:
        values = args.values or ("0,0.25,0.5,0.75" if args.sweep == "blend" else "6:5,10:3")
        args.values = [label(args.sweep, v) for v in values.split(",")]
        by_value, local = run(args)
    summary = summarize(by_value, local)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for rows in by_value.values() for r in rows})
    doc = {"seeds": seeds, "sweep": args.sweep, "fleet": FLEET, **summary}
    path.write_text(json.dumps(doc, indent=2))
    plot(summary, args.sweep, seeds, path.with_suffix(".png"))
    for value, kinds in summary["values"].items():
        ratios = ", ".join(f"{k} {s['served_over_local']:.3f}x" for k, s in kinds.items())
        wins = f"{kinds['all']['better_than_first']}/{kinds['all']['clients']}"
        log(f"{args.sweep} {value}: served/local-only {ratios}; better than the first on {wins}")
    log(f"{args.sweep} sweep: pick {summary['pick']} (results in {path})")


if __name__ == "__main__":
    main()
