"""The memory budget: batch and window length fitted from the measured footprints, and a clear
refusal naming what would fit when nothing does."""

from __future__ import annotations

import pytest

from fleetune.edge_sdk import memory
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

pytestmark = pytest.mark.unit

SMOLLM2 = BaseManifest(
    name="smollm2-135m",
    sha256="ab" * 32,
    architecture="llama",
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
)


def test_the_parameter_count_of_smollm2_from_its_manifest():
    assert memory.base_params(SMOLLM2) == memory.SMOLLM2["params"] == 134_515_008


def test_the_configured_step_is_kept_when_it_fits_and_shrunk_when_it_does_not():
    key = memory.mode("torch", "", "backprop", 0)
    full = memory.estimate_mb(key, SMOLLM2, 4 * 64)
    # Execute: a budget above the configured step, and one between batch 1 and batch 4
    kept = memory.fit_budget(full + 1, SMOLLM2, "torch", "", "backprop", 0, 4, 64)
    shrunk = memory.fit_budget(full - 1, SMOLLM2, "torch", "", "backprop", 0, 4, 64)
    # Assert: the most tokens that fit, longer windows first; never over the budget
    assert (kept.batch_size, kept.seq_len) == (4, 64) and kept.estimate_mb == full
    assert shrunk.batch_size * shrunk.seq_len < 256 and shrunk.estimate_mb <= full - 1
    assert shrunk.seq_len == 64 and shrunk.batch_size == 3


def test_a_budget_nothing_fits_is_refused_naming_the_need_and_what_would_fit():
    zo_ort = memory.estimate_mb("onnx-int8/zo/window", SMOLLM2, 4 * 64)
    backprop = memory.estimate_mb("torch-fp32/backprop/full", SMOLLM2, 16)
    assert zo_ort < backprop  # the measured footprints: forward-only int8 in a window is smaller
    with pytest.raises(ConfigError) as err:
        memory.fit_budget(zo_ort + 1, SMOLLM2, "torch", "", "backprop", 0, 4, 64)
    text = str(err.value)
    assert f"memory_budget_mb = {zo_ort + 1:g} is too small for torch-fp32/backprop/full" in text
    assert "batch 1 x 16 tokens" in text and "onnx-int8/zo/window" in text
    with pytest.raises(ConfigError, match="no measured footprint for llamacpp-f16/zo/full"):
        memory.fit_budget(500, SMOLLM2, "llamacpp", "f16", "zo", 0, 4, 64)


def test_another_base_scales_weights_by_parameters_and_activations_by_vocabulary():
    import dataclasses

    double = dataclasses.replace(SMOLLM2, num_layers=60, vocab_size=2 * 49152)
    key = "torch-fp32/zo/full"
    small, large = (memory.estimate_mb(key, b, 256) for b in (SMOLLM2, double))
    fp = memory.FOOTPRINTS[key]
    ratio = memory.base_params(double) / memory.SMOLLM2["params"]
    expected = fp.weights_mb * (ratio - 1) + 256 * fp.per_token_mb
    assert large - small == pytest.approx(memory.MARGIN * expected)


def test_the_device_config_refuses_a_negative_budget_and_reads_its_own_peak():
    from fleetune.edge_sdk.config import DeviceConfig

    with pytest.raises(ConfigError, match="memory_budget_mb must be >= 0"):
        DeviceConfig(memory_budget_mb=-1)
    assert 1 < memory.peak_rss_mb() < 100_000


def test_a_device_fits_its_step_to_the_budget_or_refuses_at_start():
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, TuningConfig

    def device(budget: float) -> EdgeClient:
        config = FleetuneConfig(
            device=DeviceConfig(memory_budget_mb=budget), tuning=TuningConfig(batch_size=8)
        )
        return EdgeClient(config, base=SMOLLM2)

    key = "torch-fp32/backprop/full"
    with pytest.raises(ConfigError, match=f"too small for {key} on smollm2-135m"):
        device(memory.estimate_mb(key, SMOLLM2, 16) - 1)
    fitted = device(memory.estimate_mb(key, SMOLLM2, 2 * 64) + 1).config.tuning
    assert (fitted.batch_size, fitted.seq_len) == (2, 64)


def test_a_torch_window_is_planned_on_the_lean_engines_runtime():
    # the lean window engine imports plain torch: its runtime is not transformers + PEFT's
    assert memory.runtime("torch-bf16/backprop/window") == "torch-window"
    assert memory.runtime("torch-fp32/backprop/full") == "torch"
    assert memory.runtime("onnx-int8/zo/window") == "onnx"
    assert memory.RUNTIME_MB["torch-window"] < memory.RUNTIME_MB["torch"]
    lean = memory.estimate_mb("torch-bf16/backprop/window", SMOLLM2, 256)
    assert lean < memory.estimate_mb("torch-fp32/backprop/full", SMOLLM2, 256) / 2


def test_a_llamacpp_step_is_planned_by_its_row_length_not_batch_times_length():
    # llama.cpp decodes a row at a time: its peak follows the row's length (benchmarks/memory.py)
    key = memory.mode("llamacpp", "", "zo", 4)
    assert key == "llamacpp-q8_0/zo/window" and memory.runtime(key) == "llamacpp"
    row = memory.estimate_mb(key, SMOLLM2, 64)
    # Execute: a budget a row of 64 fits, and one just under it
    kept = memory.fit_budget(row + 1, SMOLLM2, "llamacpp", "", "zo", 4, 8, 64)
    shorter = memory.fit_budget(row - 1, SMOLLM2, "llamacpp", "", "zo", 4, 8, 64)
    # Assert: the batch is kept whatever the budget; the rows shorten until one fits
    assert (kept.batch_size, kept.seq_len, kept.estimate_mb) == (8, 64, row)
    assert (shorter.batch_size, shorter.seq_len) == (8, 32) and shorter.estimate_mb < row
    full = memory.estimate_mb("llamacpp-q8_0/zo/full", SMOLLM2, 64)
    assert full < row  # the window engine holds the window model too: it buys speed, not memory


def test_lora_window_auto_picks_the_deepest_window_the_budget_fits():
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, TuningConfig

    key = "torch-int8/backprop/window"
    at12 = memory.estimate_mb(key, SMOLLM2, 4 * 64, 12)
    assert (
        memory.estimate_mb(key, SMOLLM2, 4 * 64, 4)
        < at12
        < memory.estimate_mb(key, SMOLLM2, 256, 13)
    )
    # Execute: a budget 12 int8 layers fit; the same in bf16; all the memory wanted; too little
    plan = memory.fit_budget(at12 + 0.1, SMOLLM2, "torch", "int8", "window", -1, 4, 64)
    bf16 = memory.fit_budget(at12 + 0.1, SMOLLM2, "torch", "bf16", "window", -1, 4, 64)
    int4 = memory.fit_budget(at12 + 0.1, SMOLLM2, "torch", "int4", "window", -1, 4, 64)
    roomy = memory.fit_budget(5000, SMOLLM2, "torch", "int8", "window", -1, 4, 64)
    one = memory.estimate_mb(key, SMOLLM2, 2 * 64, 1)
    tight = memory.fit_budget(one + 0.1, SMOLLM2, "torch", "int8", "window", -1, 4, 64)
    # Assert: the deepest window at the configured step; bf16 fits fewer (its layers and
    # embedding table weigh twice int8's), int4 more (its layers weigh 62.5% of int8's)
    assert (plan.window, plan.batch_size, plan.seq_len) == (12, 4, 64) and plan.estimate_mb == at12
    assert 1 <= bf16.window < 12 < int4.window
    assert roomy.window == SMOLLM2.num_layers
    assert (tight.window, tight.batch_size, tight.seq_len) == (1, 2, 64)
    with pytest.raises(ConfigError, match="torch-fp32/backprop/window is measured at one window"):
        memory.fit_budget(5000, SMOLLM2, "torch", "", "window", -1, 4, 64)
    # a device: its adapter's window is the plan's
    config = FleetuneConfig(
        device=DeviceConfig(memory_budget_mb=at12 + 0.1, precision="int8"),
        tuning=TuningConfig(tuner="window", lora_window=-1),
    )
    device = EdgeClient(config, base=SMOLLM2)
    assert device.spec.window == device.config.tuning.lora_window == 12
    for tuner, window in (("backprop", -1), ("window", -2)):
        with pytest.raises(ConfigError, match="lora_window must be >= 0"):
            TuningConfig(tuner=tuner, lora_window=window)
    with pytest.raises(ConfigError, match='needs backend = "torch" and \\[device\\] memory_budget'):
        FleetuneConfig(tuning=TuningConfig(tuner="window", lora_window=-1))
