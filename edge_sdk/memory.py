"""A device's memory budget: the batch and window length a tuning step fits in, from measured
footprints.

``[device] memory_budget_mb`` bounds a tuning step's peak resident memory. The step's peak is
modelled as ``runtime + weights + tokens x per_token`` (tokens = batch x sequence length; for
llama.cpp, which decodes a row at a time, the sequence length alone): ``runtime`` is what
importing the engine costs, ``weights`` what it holds of the model, ``per_token`` the
activations of one token (on SmolLM2 mostly its 49,152 logits, and for backprop their
gradients). The numbers in :data:`FOOTPRINTS` were fitted on SmolLM2-135M from
the peak RSS of fresh processes (``benchmarks/memory.py``, which also reports the fit's error at
a point it was not fitted on); for another base the weights scale with its parameter count and
``per_token`` with its vocabulary.

:func:`fit_budget` keeps the configured batch and window length when they fit and otherwise
picks the largest step (most tokens, then the longest windows) that does; the layer window
stays as configured, except ``lora_window = -1``, for which it picks the deepest window of the
lean torch engine whose configured step fits (its footprint grows by a measured amount per
layer). When nothing fits it refuses with a :class:`ConfigError` that names the smallest
step's need and the engines and tuners that would fit. A device also reads its own peak after
each round (:func:`peak_rss_mb`), so a wrong estimate shows in its metrics and its log.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

MIN_SEQ = 16  # the shortest windows a budget may pick


@dataclass(frozen=True)
class Footprint:
    weights_mb: float  # what the engine holds of SmolLM2-135M beyond its runtime
    per_token_mb: float  # activations per token in a step's batch
    per_row: bool = False  # the engine decodes a row at a time: tokens are one row's
    layer_mb: float = 0.0  # a window: what each layer more holds (0: one depth measured)
    layer_token_mb: float = 0.0  # ... and its activations per token


# Imports alone (fresh interpreter, VmHWM): torch + transformers + PEFT; plain torch (the lean
# window engine, backends/torch_window.py); onnxruntime + tokenizers.
RUNTIME_MB = {"torch": 387.0, "torch-window": 220.0, "onnx": 67.0, "llamacpp": 45.0}
# engine-precision/tuner/depth, fitted on SmolLM2-135M with LoRA r 8 on q,v, a window of 4 layers
# and a cache of 64 windows (benchmarks/memory.py, 2026-12-02; torch windows: the lean engine
# recomputing its layers for backprop, as a device under a budget runs it); the comment: the
# fit's error at batch 2 x 128 tokens, which it was not fitted on
FOOTPRINTS: dict[str, Footprint] = {
    "torch-fp32/backprop/full": Footprint(574, 2.498),  # -1.3%
    "torch-fp32/backprop/window": Footprint(256, 0.153),  # -4.4%
    # the lean engine in bf16 / int8 / int4 (int4: its layers in Q4_1 groups; int8 and int4: the
    # embedding table and head in int8, the loss by vocabulary slabs) also at a window of 29
    # layers, the deepest with a cache (a window of all 30 caches nothing): what each layer more
    # holds, and its activations per token (2026-12-03, gradients and the recomputed layers'
    # inputs in buffers allocated once); errors at 4 and 29 layers
    "torch-bf16/backprop/window": Footprint(197, 0.0942, False, 6.76, 0.00223),  # -5.3%, -5.8%
    "torch-int8/backprop/window": Footprint(129, 0.182, False, 3.84, 0.0011),  # -0.8%, -2.5%
    "torch-int4/backprop/window": Footprint(140, 0.142, False, 2.44, 0.00029),  # +0.5%, -1.7%
    "torch-fp32/zo/full": Footprint(577, 0.488),  # -1.4%
    "torch-fp32/zo/window": Footprint(234, 0.110),  # -5.0%
    "onnx-fp32/zo/full": Footprint(616, 0.824),  # +1.6%
    "onnx-int8/zo/full": Footprint(446, 0.837),  # +0.1%
    "onnx-fp32/zo/window": Footprint(522, 0.535),  # +3.8%
    "onnx-int8/zo/window": Footprint(381, 0.839),  # +3.2%
    # llama.cpp decodes a row at a time: fitted through 1 x 64 and 1 x 192 tokens (2026-12-02)
    "llamacpp-q8_0/zo/full": Footprint(201, 0.954, per_row=True),  # +0.1%
    "llamacpp-q8_0/zo/window": Footprint(293, 0.871, per_row=True),  # +5.7%
    "llamacpp-q4_0/zo/full": Footprint(207, 0.945, per_row=True),  # -0.5%
    "llamacpp-q4_0/zo/window": Footprint(300, 0.872, per_row=True),  # +1.0%
}
WINDOW = 4  # the window the footprints were fitted at
MARGIN = 1.06  # on every estimate: the fits' largest underestimate at the check point, 5.8%
DEFAULT_PRECISION = {"llamacpp": "q8_0"}  # config.py's "" per engine; fp32 elsewhere
SMOLLM2 = {"params": 134_515_008, "vocab": 49_152, "hidden": 576}


@dataclass(frozen=True)
class Plan:
    """What a tuning step runs with under the budget."""

    mode: str
    batch_size: int
    seq_len: int
    estimate_mb: float
    window: int = 0  # the layer window (picked by the budget for lora_window = -1)


def base_params(base: BaseManifest) -> int:
    """Parameters of a llama-style base from its manifest (tied embedding counted once)."""
    h, kv = base.hidden_size, base.num_kv_heads * base.head_dim
    attention = 2 * h * base.num_heads * base.head_dim + 2 * h * kv
    layer = attention + 3 * h * base.intermediate_size + 2 * h
    return base.vocab_size * h + base.num_layers * layer + h


def mode(engine: str, precision: str, tuner: str, window: int) -> str:
    """The :data:`FOOTPRINTS` key of a device's engine and tuner."""
    kind = {"window": "backprop", "backprop": "backprop", "zo": "zo"}.get(tuner, tuner)
    depth = "window" if window and tuner in ("window", "zo") else "full"
    return f"{engine}-{precision or DEFAULT_PRECISION.get(engine, 'fp32')}/{kind}/{depth}"


def step_tokens(key: str, batch: int, seq: int) -> int:
    """The tokens whose activations a step of ``batch x seq`` holds at once in mode ``key``."""
    return seq if FOOTPRINTS[key].per_row else batch * seq


def estimate_mb(key: str, base: BaseManifest, tokens: int, window: int = WINDOW) -> float:
    """Modelled peak RSS of a step of ``tokens`` tokens in mode ``key`` (with :data:`MARGIN`),
    a window mode at ``window`` layers where its footprint has a per-layer part."""
    fp = FOOTPRINTS[key]
    more = window - WINDOW if fp.layer_mb else 0
    weights = (fp.weights_mb + more * fp.layer_mb) * base_params(base) / SMOLLM2["params"]
    per_token = fp.per_token_mb * base.vocab_size / SMOLLM2["vocab"]
    per_token += more * fp.layer_token_mb * base.hidden_size / SMOLLM2["hidden"]
    return MARGIN * (RUNTIME_MB[runtime(key)] + weights + tokens * per_token)


def runtime(key: str) -> str:
    """The :data:`RUNTIME_MB` entry of mode ``key``: torch with a window is the lean engine
    (plain torch, ``backends/torch_window.py``)."""
    engine = key.split("-")[0]
    return "torch-window" if engine == "torch" and key.endswith("/window") else engine


def fit_budget(
    budget_mb: float,
    base: BaseManifest,
    engine: str,
    precision: str,
    tuner: str,
    window: int,
    batch_size: int,
    seq_len: int,
) -> Plan:
    """The largest ``batch x seq_len`` step (at most the configured one) whose modelled peak
    is within ``budget_mb``; a :class:`ConfigError` naming what would fit when none is.
    ``window = -1``: the deepest top window whose configured step fits (the engine's footprint
    per layer), else the largest step a window of one layer fits."""
    key = mode(engine, precision, tuner, window)
    if key not in FOOTPRINTS:
        raise ConfigError(
            f"[device] memory_budget_mb: no measured footprint for {key} (measured: "
            f"{', '.join(sorted(FOOTPRINTS))}); set memory_budget_mb = 0 or pick one of those"
        )
    if window == -1:
        if not FOOTPRINTS[key].layer_mb:
            deep = sorted(k for k, fp in FOOTPRINTS.items() if fp.layer_mb)
            raise ConfigError(
                f"lora_window = -1: {key} is measured at one window size only; the window "
                f"that fits is picked for {', '.join(deep)} (set [device] precision)"
            )
        tokens = step_tokens(key, batch_size, seq_len)
        for depth in range(base.num_layers, 0, -1):
            peak = estimate_mb(key, base, tokens, depth)
            if peak <= budget_mb:
                return Plan(key, batch_size, seq_len, peak, depth)
        window = 1
    seqs = [s for s in (seq_len >> i for i in range(8)) if s >= MIN_SEQ] or [seq_len]
    fits = [
        (b * s, s, b)
        for s in seqs
        for b in range(batch_size, 0, -1)
        if estimate_mb(key, base, step_tokens(key, b, s), window) <= budget_mb
    ]
    if fits:
        _, seq, batch = max(fits)
        peak = estimate_mb(key, base, step_tokens(key, batch, seq), window)
        return Plan(key, batch, seq, peak, window)
    least = estimate_mb(key, base, seqs[-1], window)
    need = {k: estimate_mb(k, base, step_tokens(k, batch_size, seq_len)) for k in FOOTPRINTS}
    others = sorted((mb, k) for k, mb in need.items() if k != key and mb <= budget_mb)
    offer = ", ".join(f"{k} (~{mb:.0f} MB)" for mb, k in others) or "nothing measured"
    raise ConfigError(
        f"[device] memory_budget_mb = {budget_mb:g} is too small for {key} on {base.name}: even "
        f"batch 1 x {seqs[-1]} tokens needs ~{least:.0f} MB. What fits {budget_mb:g} MB at "
        f"batch {batch_size} x {seq_len}: {offer}"
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM on Linux, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
