"""What ``fleetune demo`` shows: a table per device and a plot of perplexity per round."""

from __future__ import annotations

import math
from pathlib import Path


def format_table(doc: dict) -> str:
    rows = [
        f"{'device':<10} {'role':<7} {'client':<26} {'ppl_base':>9} {'ppl_local':>9} "
        f"{'ppl_final':>9} {'ppl_served':>10} {'serves':<9} {'KB up':>8} {'KB down':>8}"
    ]
    for d in doc["devices"]:
        served = d.get("ppl_served", math.nan)
        role = f"top {d['window']}" if d.get("window") else d.get("role", "fleet")
        rows.append(
            f"{d['device']:<10} {role:<7} {d['client'][:26]:<26} "
            f"{d['ppl_base']:>9.1f} {d['ppl_local']:>9.1f} {d['ppl_final']:>9.1f} "
            f"{served:>10.1f} {d.get('served', '') or '-':<9} "
            f"{d['bytes_up'] / 1e3:>8.1f} "
            f"{d['bytes_down'] / 1e3:>8.0f}"
        )
    rows.append(
        f"{doc['rounds']} rounds × {doc['steps_per_round']} steps, backend "
        f"{doc['backend']}, tuner {doc['tuner']}, 1 thread per device, "
        f"{doc['seconds']:.0f} s"
    )
    return "\n".join(rows)


def plot(doc: dict, path: Path) -> None:
    """Held-out perplexity per round and device: solid = global adapter, dotted = after local
    tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, d in enumerate(doc["devices"]):
        # a round's entry holds the global adapter it started from (the previous round's result)
        # and the local perplexity after tuning; the closing entry holds the final adapter
        points = [(0, d["ppl_base"])]
        points += [(h["round"] - ("ppl_local" in h), h["ppl_global"]) for h in d["history"]]
        gx, gy = zip(*sorted(set(points)), strict=False)
        unseen = " (unseen: mixture)" if d.get("role") == "unseen" else ""
        ax.plot(
            gx,
            gy,
            "--o" if unseen else "-o",
            color=f"C{i}",
            label=f"{d['device']} {d['client']}{unseen}",
        )
        local = [(h["round"], h["ppl_local"]) for h in d["history"] if "ppl_local" in h]
        if local:
            ax.plot(*zip(*local, strict=False), ":x", color=f"C{i}")
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(
        f"fleetune demo: {doc['backend']} / {doc['tuner']}, "
        f"{doc['steps_per_round']} steps per round\n"
        "solid: global adapter after the round · dotted: after local tuning"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_improved(doc: dict) -> bool:
    return all(
        d["ppl_final"] < d["ppl_base"] and math.isfinite(d["ppl_final"]) for d in doc["devices"]
    )
