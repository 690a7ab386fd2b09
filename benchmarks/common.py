"""Helpers shared by the benchmarks: held-out perplexity, a fresh process's peak RSS, intervals
and a bar plot of perplexity ratios."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

# appended to a child's code: its peak resident set size, in KiB (VmHWM survives nothing of the
# parent, unlike ru_maxrss after fork + exec)
PRINT_PEAK_RSS = (
    '\nprint([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])\n'
)


def peak_rss_mb(child_code: str, *args: str) -> float:
    """Run ``child_code`` in a fresh interpreter and return its peak RSS in MB."""
    out = subprocess.run(
        [sys.executable, "-c", child_code + PRINT_PEAK_RSS, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def perplexity(loss, windows: np.ndarray, theta: np.ndarray, batch: int = 4) -> float:
    """exp(mean token loss) of ``loss(window_batch, theta)`` over ``windows``."""
    losses = [
        loss(windows[i : i + batch], theta) * len(windows[i : i + batch])
        for i in range(0, len(windows), batch)
    ]
    return float(np.exp(sum(losses) / len(windows)))


def log(text: str) -> None:
    """Progress on stderr, flushed (stdout may carry a result)."""
    print(text, file=sys.stderr, flush=True)


# Student's t, 97.5% quantile, by sample size (n - 1 degrees of freedom)
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306}


def part_of(spec: str) -> tuple[int, int]:
    """``--part I/N``: this process runs every N-th item from the I-th, counted from 0."""
    part, parts = (int(x) for x in spec.split("/"))
    if not 0 <= part < parts:
        raise SystemExit(f"--part {spec}: I runs from 0 to N-1 (0/2 and 1/2 split a run in two)")
    return part, parts


def geomean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def sweep_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every personalization sweep takes (on the 12 clients not in the report)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--mixed", help="mixed corpus JSONL (default: build it)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--lr", type=float, default=1e-3, help="the devices' AdamW lr")
    return parser


def interval(values: list[float]) -> dict:
    """The mean of ``values`` (one per seed) and its 95% t-interval."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    half = T975.get(len(values), 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def save_plot(fig, ax, path: Path, legend: dict | None = None) -> None:
    """Legend (``legend``: its options), grid, tight layout; write ``path`` and close."""
    import matplotlib.pyplot as plt

    ax.legend(**(legend or {"fontsize": 7}))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_bars(summary: dict, methods, path: Path, title: str, ylabel: str, **legend) -> None:
    """Bars of each method's ``ppl_{method}`` over ``ppl_base`` per group of ``summary`` (its
    keys), with the 95% interval over seeds (``ppl_{method}_ci95``; none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        rows = [summary[g] for g in groups]
        means = [s[f"ppl_{m}"] / s["ppl_base"] for s in rows]
        ci = [s[f"ppl_{m}_ci95"] or [s[f"ppl_{m}"]] * 2 for s in rows]
        lows = [c[0] / s["ppl_base"] for c, s in zip(ci, rows, strict=True)]
        highs = [c[1] / s["ppl_base"] for c, s in zip(ci, rows, strict=True)]
        xs = np.arange(len(groups)) + (j - len(methods) / 2 + 0.5) * width
        err = [np.subtract(means, lows), np.subtract(highs, means)]
        ax.bar(xs, means, width, yerr=err, label=m, color=f"C{j}", capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**(legend or {"fontsize": 8}))
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
