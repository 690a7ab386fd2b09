"""The mixture arm of ``benchmarks/personalization.py`` and the sweep of its search's lr and eps.

A mixture fleet spends a device's compute as the product does with ``--tuner mix``: in round 1
every device tunes LoRA B alone (the fleet's shared A) for S AdamW steps from the shared init;
the server clusters those adapters with k-means into a basis of K (``server/basis.kmeans``, as
``server/mixtures.py``). Each device then spends what the other federations spend on rounds
2..R, (R - 1) x S AdamW steps, on one of:

  mix_avg   the basis average: the search's start, zero steps
  mix       the coefficient search (``edge_sdk/tuners/mix.tune_mix``: SPSA on K coefficients,
            one fixed training batch as the objective, early stopping on validation windows)
  mix_bp    (R - 1) x S AdamW steps on the whole LoRA from the basis average (warm-started
            backprop; its measured wall-clock is the budget of the next two)
  mix_zo    B-only MeZO from the basis average (the product's ZO defaults, a fresh batch a step)

The search and MeZO get the wall-clock ``mix_bp`` took on that client, measured in the same
process just before them (a search chunk starts only if it fits in what is left).

The sweep (``python -m benchmarks.mixture_fleet --json PATH``) picks the search's lr and eps on
a fleet of 12 clients that are not in the report (4 of each kind), 1 seed:

    python -m benchmarks.mixture_fleet --json results/sweep_mixture.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from benchmarks.common import geomean, log, sweep_parser  # noqa: E402
from fleetune.edge_sdk.adapters.lora import init_lora  # noqa: E402
from fleetune.edge_sdk.evaluation import perplexity  # noqa: E402
from fleetune.edge_sdk.protocol import BASIS_PART, Basis  # noqa: E402
from fleetune.edge_sdk.tuners.mix import (  # noqa: E402
    MixConfig,
    Mixer,
    engine_loss,
    tune_mix,
    window_mean,
)
from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune  # noqa: E402
from fleetune.server.basis import kmeans  # noqa: E402

MIX_METHODS = ("mix_avg", "mix", "mix_bp", "mix_zo")
BASIS_K = 8  # the product's default basis_k
# the sweep's fleet: none of them in the report (benchmarks/personalization.CLIENTS)
SWEEP_CLIENTS = {
    "shakespeare": ("hamlet/HAMLET", "othello/IAGO", "king-lear/KING LEAR", "macbeth/MACBETH"),
    "pydocs": ("pydocs/c-api", "pydocs/reference", "pydocs/distutils", "pydocs/using"),
    "fortunes": (
        "fortunes-it/norm",
        "fortunes-es/sabiduria",
        "fortunes-de/unfug",
        "fortunes-it/computer",
    ),
}


def fleet_basis(tb, spec, base, prepared: dict, seed: int, steps: int, lr: float) -> Basis:
    """Round 1 of a mixture fleet: every device's B-only adapter after ``steps`` AdamW steps
    from the shared init (round 1's batch seeds of the other federations), clustered into the
    basis."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    init, index, members = init_lora(spec, base), tb.layout.indices(BASIS_PART), []
    for i, data in enumerate(prepared.values()):
        tb.set_adapter(init)
        tune_backprop(tb, data["train"], steps, lr, 4, seed * 1000 + 100 + i, params=BASIS_PART)
        members.append(tb.layout.flatten(tb.get_adapter())[index])
        log(f"seed {seed} mixture round 1: {i + 1}/{len(prepared)} devices tuned")
    centroids, _ = kmeans(np.stack(members), min(BASIS_K, len(members)), seed=seed)
    return Basis(1, centroids.astype(np.float32), spec, base.sha256)


def search(tb, mixer: Mixer, data: dict, config: MixConfig, seconds: float | None, seed: int):
    """The coefficient search from the basis average: chunks of ``config.eval_every`` steps,
    the best on validation kept, while ``config.steps`` are not done and the next chunk fits in
    ``seconds`` (None: no limit). Returns (coefficients, steps)."""
    mix_loss = engine_loss(tb, mixer)
    train, val = data["train"], data["val"]
    rng = np.random.default_rng(seed)
    fixed = train[rng.choice(len(train), min(4, len(train)), replace=False)]

    def validate(coef: np.ndarray) -> float:
        return window_mean(mix_loss, val, coef, 4)

    config = MixConfig(**{**config.__dict__, "patience": 10**6, "seconds": seconds})
    coef, metrics = tune_mix(
        lambda c, s: mix_loss(fixed, c), validate, mixer.basis.start(1), config, rng
    )
    return coef, metrics["steps"]


def mixture_arms(tb, spec, base, prepared: dict, seed: int, args) -> tuple[dict, dict]:
    """Each client's adapter per mixture method ({method: {client: tensors}}) and what each
    spent ({client: {steps and seconds}})."""
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    basis = fleet_basis(tb, spec, base, prepared, seed, args.steps, args.lr)
    mixer = Mixer(basis, base)
    average = mixer.adapter(basis.start(1))
    config = MixConfig(steps=10**6, lr=args.mix_lr, eps=args.mix_eps, eval_every=5)
    arms: dict = {m: {} for m in MIX_METHODS}
    spent: dict = {}
    for i, (name, data) in enumerate(prepared.items()):
        arms["mix_avg"][name] = average
        tb.set_adapter(average)
        bp = tune_backprop(
            tb, data["train"], (args.rounds - 1) * args.steps, args.lr, 4, seed * 1000 + 500 + i
        )
        arms["mix_bp"][name], budget = tb.get_adapter(), bp["seconds"]
        began = time.monotonic()
        coef, mix_steps = search(tb, mixer, data, config, budget, seed * 1000 + 600 + i)
        mix_seconds = time.monotonic() - began
        arms["mix"][name] = mixer.adapter(coef)
        theta = tb.layout.flatten(average)
        zo_steps, rng, began = 0, np.random.default_rng(seed * 1000 + 700 + i), time.monotonic()
        zo, tuned, train = ZOConfig(pool_seed=seed), tb.layout.indices("lora_b"), data["train"]
        while time.monotonic() - began < budget:
            batch = train[rng.choice(len(train), min(4, len(train)), replace=False)]
            zo_tune(lambda th, s, b=batch: tb.loss_flat(b, th), theta, tuned, 1, zo, rng)
            zo_steps += 1
        arms["mix_zo"][name] = tb.layout.unflatten(theta)
        spent[name] = {
            "mix_bp_steps": bp["steps"],
            "budget_s": budget,
            "mix_steps": mix_steps,
            "mix_s": mix_seconds,
            "mix_zo_steps": zo_steps,
            "mix_zo_s": time.monotonic() - began,
        }
        log(f"seed {seed} mixture {name}: {spent[name]}")
    return arms, spent


def main() -> None:
    from benchmarks.personalization import clients, mixed_corpus, prepare

    parser = sweep_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="round 1's AdamW steps")
    parser.add_argument("--search-steps", type=int, default=30, help="SPSA steps per search")
    parser.add_argument("--configs", default="0.1:0.1,0.3:0.1,1.0:0.1,0.3:0.03", help="lr:eps,...")
    parser.add_argument("--tune", type=int, default=6, help="clients searched (all teach)")
    args = parser.parse_args()
    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.base import prepare_base

    base, spec = prepare_base("smollm2-135m"), LoraSpec()
    tb = TorchBackend(base, spec)
    prepared = prepare(tb, clients(mixed_corpus(args.mixed), names=SWEEP_CLIENTS))
    basis = fleet_basis(tb, spec, base, prepared, args.seed, args.steps, args.lr)
    mixer = Mixer(basis, base)
    # every kind among the searched clients (2 of each when --tune is 6)
    picked = [n for trio in zip(*SWEEP_CLIENTS.values(), strict=True) for n in trio][: args.tune]
    rows = []
    for name in picked:
        tb.set_adapter(mixer.adapter(basis.start(1)))
        ppl = perplexity(tb, prepared[name]["heldout"], 4)
        rows.append({"lr": 0.0, "eps": 0.0, "client": name, "ppl": ppl, "steps": 0})
    for lr, eps in [map(float, pair.split(":")) for pair in args.configs.split(",")]:
        config = MixConfig(steps=args.search_steps, lr=lr, eps=eps, eval_every=5)
        for name in picked:
            coef, steps = search(tb, mixer, prepared[name], config, None, args.seed)
            tb.set_adapter(mixer.adapter(coef))
            ppl = perplexity(tb, prepared[name]["heldout"], 4)
            rows.append({"lr": lr, "eps": eps, "client": name, "ppl": ppl, "steps": steps})
            log(f"lr {lr} eps {eps} {name}: held-out ppl {ppl:.2f} after {steps} steps")
    configs = sorted({(r["lr"], r["eps"]) for r in rows})
    table = [
        {
            "lr": lr,
            "eps": eps,
            "ppl": geomean([r["ppl"] for r in rows if (r["lr"], r["eps"]) == (lr, eps)]),
        }
        for lr, eps in configs
    ]
    best = min((t for t in table if t["lr"] > 0), key=lambda t: t["ppl"])
    doc = {
        "clients": picked,
        "fleet": [n for v in SWEEP_CLIENTS.values() for n in v],
        "seed": args.seed,
        "search_steps": args.search_steps,
        "basis_k": basis.k,
        "table": table,
        "pick": best,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    log(json.dumps(table, indent=2))
    log(
        f"pick: lr {best['lr']} eps {best['eps']} (geometric mean {best['ppl']:.2f}; "
        f"basis average {table[0]['ppl']:.2f})"
    )


if __name__ == "__main__":
    main()
