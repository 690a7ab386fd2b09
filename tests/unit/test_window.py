"""Layer-window adapters on a random 4-layer llama: the window's loss from cached prefix states
is the full model's loss, gradients reach only the window, and a window adapter is a PEFT
adapter of the top layers."""

from __future__ import annotations

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, load_peft, save_peft
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop, window_zo
from fleetune.edge_sdk.tuners.zo import ZOConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def four_layers(tiny_base4):
    return tiny_base4


def _adapter(spec, base, seed=0):
    """An adapter with every B non-zero, so the window changes the loss."""
    rng = np.random.default_rng(seed)
    return {
        k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in init_lora(spec, base).items()
    }


def test_a_window_adapts_only_the_top_layers_and_keeps_the_full_adapters_a(four_layers):
    full, window = LoraSpec(r=2), LoraSpec(r=2, window=2)
    names = [n for n, _ in window.layout(four_layers)]
    assert all(".layers.2." in n or ".layers.3." in n for n in names) and len(names) == 8
    a_full, a_window = init_lora(full, four_layers), init_lora(window, four_layers)
    for name, value in a_window.items():  # the same A as the full-depth adapter's layers
        np.testing.assert_array_equal(value, a_full[name])
    with pytest.raises(ConfigError, match="window 5 exceeds the 4 layers"):
        LoraSpec(window=5).layout(four_layers)
    assert LoraSpec.from_dict(window.to_dict()) == window and "window" not in full.to_dict()


def test_the_window_loss_from_cached_states_is_the_full_models_loss(four_layers, tmp_path):
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare: the same adapter on a full-depth engine (B zero below the window) and a window one
    spec = LoraSpec(r=2, window=2)
    tensors = _adapter(spec, four_layers)
    full_spec = LoraSpec(r=2)
    full_tensors = {**init_lora(full_spec, four_layers), **tensors}
    ids = np.random.default_rng(0).integers(0, 128, size=(6, 16))
    window, full = TorchBackend(four_layers, spec), TorchBackend(four_layers, full_spec)
    window.set_adapter(tensors)
    full.set_adapter(full_tensors)
    # Execute: the cache in RAM and on disk
    ram = build_cache(window, ids, batch=4)
    disk = build_cache(window, ids, path=tmp_path / "cache.f32", batch=4)
    # Assert: same loss (float32 tolerance), same cache either way, its size stated
    expected = full.loss(ids)
    got = float(window.window_loss_tensor(ram.hidden, ids).detach())
    assert got == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(disk.hidden), ram.hidden)
    assert ram.nbytes == disk.nbytes == 6 * 16 * 32 * 4 and disk.where.endswith("cache.f32")
    np.testing.assert_array_equal(disk.hidden[[5, 1]], ram.hidden[[5, 1]])  # a step's rows
    np.testing.assert_array_equal(disk.hidden[2], ram.hidden[2])


def test_gradients_reach_only_the_window_and_tuning_lowers_the_loss(four_layers):
    import torch

    from fleetune.edge_sdk.backends.torch import TorchBackend

    spec = LoraSpec(r=2, window=1)
    backend = TorchBackend(four_layers, spec)
    backend.set_adapter(_adapter(spec, four_layers))
    cycle = np.tile(np.arange(16), 40)[:512].reshape(-1, 16)
    cache = build_cache(backend, cycle)
    params = backend.trainable("all")
    loss = backend.window_loss_tensor(cache.hidden[:4], cache.ids[:4])
    loss.backward()
    # Assert: LoRA weights get gradients, nothing else in the model does (it is all frozen)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    others = [p for p in backend.model.parameters() if all(p is not q for q in params)]
    assert others and all(p.grad is None for p in others)
    before = float(loss.detach())
    backend.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    metrics = window_backprop(backend, cache, steps=30, lr=5e-2, batch_size=4, seed=0)
    after = float(backend.window_loss_tensor(cache.hidden[:8], cache.ids[:8]).detach())
    assert metrics["steps"] == 30 and after < 0.95 * before


def test_zo_in_the_window_moves_only_the_window_and_replays(four_layers):
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.zo import replay

    spec = LoraSpec(r=2, window=2)
    backend = TorchBackend(four_layers, spec)
    start = _adapter(spec, four_layers)
    cache = build_cache(backend, np.tile(np.arange(16), 40)[:256].reshape(-1, 16))
    theta = backend.layout.flatten(start)
    tuned = backend.layout.indices("lora_b")
    before = theta.copy()
    pairs, metrics = window_zo(
        backend, cache, theta, tuned, 20, ZOConfig(lr=1e-2, pool_seed=3), np.random.default_rng(0)
    )
    assert metrics["forward_passes"] == 40 and theta.size == backend.layout.size
    untouched = np.setdiff1d(np.arange(theta.size), tuned)
    np.testing.assert_array_equal(theta[untouched], before[untouched])
    np.testing.assert_allclose(
        theta[tuned] - before[tuned], replay(pairs, 3, tuned.size), atol=1e-5
    )


def test_a_window_adapter_is_a_peft_adapter_of_the_top_layers(four_layers, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(r=2, window=2)
    tensors = _adapter(spec, four_layers)
    folder = save_peft(tmp_path / "a", tensors, spec, four_layers)
    again, spec_again = load_peft(folder, four_layers)
    assert spec_again == spec and set(again) == set(tensors)
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(four_layers.hf_dir), folder
    )
    adapted = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted and all(".layers.2." in n or ".layers.3." in n for n in adapted)


def test_onnx_prefix_and_window_graphs_give_the_full_models_loss(four_layers, tmp_path):
    pytest.importorskip("onnxruntime")
    import dataclasses
    import shutil

    from tokenizers import Tokenizer, models

    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.models.onnx import export_onnx

    # Prepare: the tiny base with a word-level tokenizer (an ONNX bundle carries one)
    hf_dir = tmp_path / "hf"
    shutil.copytree(four_layers.hf_dir, hf_dir)
    vocab = {f"t{i}": i for i in range(128)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(hf_dir / "tokenizer.json"))
    base = dataclasses.replace(four_layers, hf_dir=str(hf_dir))
    spec = LoraSpec(r=2, window=2)
    tensors = _adapter(spec, base)
    ids = np.random.default_rng(0).integers(0, 128, size=(6, 16))
    # Execute: the window graphs from the ONNX bundle, the full model in torch
    root = export_onnx(base, spec, tmp_path / "bundle", graphs=("prefix_fp32", "window_fp32"))
    engine = OnnxBackend(root)
    engine.set_adapter(tensors)
    cache = build_cache(engine, ids, batch=4)
    torch_engine = TorchBackend(base, spec)
    torch_engine.set_adapter(tensors)
    # Assert: the cached states and the loss from them match torch (float32 tolerance)
    assert engine.capabilities.window and cache.nbytes == 6 * 16 * 32 * 4
    np.testing.assert_allclose(cache.hidden, build_cache(torch_engine, ids).hidden, atol=1e-5)
    expected = torch_engine.loss(ids)
    assert engine.window_loss_flat(cache.hidden, ids, engine.flat) == pytest.approx(
        expected, rel=1e-5
    )
    assert engine.loss(ids) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="ends at layer 2, not 1"):
        engine.prefix(ids, 1)
    with pytest.raises(ConfigError, match="only for an adapter with lora_window"):
        export_onnx(base, LoraSpec(r=2), tmp_path / "b2", graphs=("fp32", "window_fp32"))


def test_a_window_device_whose_prefix_is_the_frozen_base_refuses_a_deeper_fleet():
    """An engine that cannot run the layers below its window under the fleet's adapter (the
    ONNX window bundle's prefix graph has no adapter input) ends the run with a clear error."""
    from dataclasses import replace
    from types import SimpleNamespace

    from fleetune.edge_sdk.backends import Capabilities
    from fleetune.edge_sdk.protocol import Announcement, Fleet
    from fleetune.edge_sdk.rounds import join
    from tests.fuzz.targets import BASE, SPEC

    spec = replace(SPEC, window=1)
    client = SimpleNamespace(
        device="pi-1",
        spec=spec,
        fleet=Fleet(BASE, spec),
        backend=SimpleNamespace(capabilities=Capabilities(window=True)),
    )
    join(client, Announcement(1, 0, BASE.sha256, spec.to_dict()))  # its own layers: fine
    with pytest.raises(ConfigError, match=r"reaches below them.*SimpleNamespace cannot"):
        join(client, Announcement(1, 0, BASE.sha256, SPEC.to_dict()))
    client.backend.capabilities = Capabilities(window=True, prefix_adapter=True)
    join(client, Announcement(1, 0, BASE.sha256, SPEC.to_dict()))


def test_a_device_under_a_budget_keeps_a_large_prefix_cache_on_disk(four_layers, tmp_path):
    """A cache larger than the RAM the budget leaves it goes to a file in the device's state
    dir; tuning from it gives what tuning from RAM gives; a new prefix replaces the file, and
    closing the tuner removes it."""
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.config import TuningConfig
    from fleetune.edge_sdk.data import ClientData
    from fleetune.edge_sdk.tuners import make_tuner
    from fleetune.edge_sdk.tuners.base import Job

    spec = LoraSpec(r=2, window=2)
    engine = TorchWindowBackend(four_layers, spec)
    cycle = np.tile(np.arange(16), 40)[:512].reshape(-1, 16)
    data = ClientData("c", train=cycle, heldout=cycle[:4])
    tuned = {}
    for where, ram_mb in (("ram", float("inf")), ("disk", 0.01)):  # the cache is 0.06 MB
        config = TuningConfig(tuner="window", steps=5, lr=5e-2, lora_r=2, lora_window=2)
        tuner = make_tuner(config, engine.layout)
        tuner.cache_ram_mb, tuner.cache_dir = ram_mb, tmp_path / where
        result = tuner.tune(engine, data, init_lora(spec, four_layers), Job("d", 1))
        tuned[where] = (result.adapter, result.metrics)
        if where == "disk":
            files = sorted(p.name for p in (tmp_path / where).iterdir())
            engine.set_prefix_adapter({})  # nothing new below: the same cache stands
            assert tuner.prefix_cache(engine, data.train) is tuner._prefix[2]
            tuner.close()
            assert not any((tmp_path / where).iterdir())
    assert files == ["prefix-states.f32"]
    assert tuned["ram"][1]["cache_on_disk"] is False and tuned["disk"][1]["cache_on_disk"]
    for name, value in tuned["ram"][0].items():
        np.testing.assert_array_equal(tuned["disk"][0][name], value)
