"""The lean torch window engine (plain torch, the window and the head only) against the
transformers + PEFT engine on a random 4-layer llama: the same prefix states, losses and
gradients; bf16 close; its AdamW is torch's; it imports neither transformers nor torch.optim."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.errors import BackendError, ConfigError
from fleetune.edge_sdk.tuners.window import build_cache, window_backprop

pytestmark = pytest.mark.unit
torch = pytest.importorskip("torch")


def _adapter(spec, base, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in init_lora(spec, base).items()
    }


@pytest.fixture(scope="module")
def engines(tiny_base4):
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    spec = LoraSpec(r=2, window=2, targets=("q_proj", "v_proj", "down_proj"))
    tensors = _adapter(spec, tiny_base4)
    reference, lean = TorchBackend(tiny_base4, spec), TorchWindowBackend(tiny_base4, spec)
    reference.set_adapter(tensors)
    lean.set_adapter(tensors)
    return spec, tensors, reference, lean


def test_streamed_prefix_window_loss_and_full_loss_match_transformers(
    engines, tmp_path, monkeypatch
):
    _, _, reference, lean = engines
    ids = np.random.default_rng(0).integers(0, 128, size=(11, 16))  # 11 rows: a partial chunk
    monkeypatch.setattr("fleetune.edge_sdk.tuners.window.CHUNK_ROWS", 4)  # 3 chunks to a file
    # Execute: the lean engine streams the two layers below the window into a disk cache
    cache = build_cache(lean, ids, path=tmp_path / "states.f32")
    expected = reference.prefix(ids, 2)
    # Assert: float32 tolerance everywhere (the same math, other kernels)
    np.testing.assert_allclose(np.asarray(cache.hidden), expected, rtol=1e-5, atol=1e-5)
    got = float(lean.window_loss_tensor(cache.hidden[:4], ids[:4]).detach())
    assert got == pytest.approx(reference.loss(ids[:4]), rel=1e-5)
    assert lean.loss(ids[4:]) == pytest.approx(reference.loss(ids[4:]), rel=1e-5)


def test_a_window_of_every_layer_caches_nothing_and_looks_its_states_up(tiny_base4, tmp_path):
    """A window from layer 0 has no prefix: build_cache keeps no states (not in RAM, no file
    even when asked for one); a step's rows are the embedding rows, and the loss and training
    are those of the full model."""
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.tuners.window import cache_mb

    spec = LoraSpec(r=2, window=4)
    tensors = _adapter(spec, tiny_base4)
    lean, reference = TorchWindowBackend(tiny_base4, spec), TorchBackend(tiny_base4, spec)
    lean.set_adapter(tensors)
    reference.set_adapter(tensors)
    ids = np.random.default_rng(2).integers(0, 128, size=(6, 16))
    cache = build_cache(lean, ids, path=tmp_path / "states.f32")
    assert (cache.where, cache.nbytes, len(cache.hidden)) == ("lookup", 0, 6)
    assert cache.metrics() == {"cache_mb": 0.0, "cache_on_disk": False}
    assert not (tmp_path / "states.f32").exists() and cache_mb(lean, 6, 16) == 0.0
    np.testing.assert_allclose(cache.hidden[[1, 4]], reference.prefix(ids[[1, 4]], 0), atol=1e-6)
    assert cache.hidden[3].shape == (16, 32)
    got = float(lean.window_loss_tensor(cache.hidden[:4], ids[:4]).detach())
    assert got == pytest.approx(reference.loss(ids[:4]), rel=1e-5)
    before = float(lean.window_loss_tensor(cache.hidden[:], ids).detach())
    window_backprop(lean, cache, steps=10, lr=5e-2, batch_size=4, seed=0)
    assert float(lean.window_loss_tensor(cache.hidden[:], ids).detach()) < before


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_match_peft_and_reach_only_the_window(engines, recompute):
    _, tensors, reference, lean = engines
    lean.recompute = recompute  # activation checkpointing: the same gradients
    ids = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    hidden = reference.prefix(ids, 2)
    grads = {}
    for engine in (reference, lean):
        engine.set_adapter(tensors)
        params = engine.trainable("all")
        for p in params:
            p.grad = None
        engine.window_loss_tensor(hidden, ids).backward()
        grads[engine] = {n: p.grad.numpy().copy() for n, p in engine._params.items()}
    assert set(grads[lean]) == set(grads[reference]) == set(tensors)
    for name, grad in grads[reference].items():  # the fused head's hand-written gradient too
        np.testing.assert_allclose(grads[lean][name], grad, rtol=1e-4, atol=1e-7)
    frozen = [*lean.model.parameters()]
    assert all(p.grad is None for p in frozen if all(p is not q for q in lean._params.values()))


def test_a_second_forward_before_the_backward_fails_loudly(engines, monkeypatch):
    """Recomputed layers keep their inputs in buffers reused step after step: a graph whose
    buffers a later forward pass overwrote refuses its backward instead of using them."""
    _, tensors, reference, lean = engines
    monkeypatch.setattr(lean, "recompute", True)
    lean.set_adapter(tensors)
    ids = np.random.default_rng(4).integers(0, 128, size=(2, 4, 16))
    hidden = [reference.prefix(rows, 2) for rows in ids]
    stale = lean.window_loss_tensor(hidden[0], ids[0])
    lean.window_loss_tensor(hidden[1], ids[1]).backward()  # the latest graph is fine
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_a_prefix_under_the_fleets_adapter_gives_the_full_models_loss(tiny_base4):
    """A window device in a full-depth fleet: its window's tensors as the adapter, the layers
    below under the fleet's (``set_prefix_adapter``) = the whole adapter at full depth."""
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    fleet, mine = LoraSpec(r=2), LoraSpec(r=2, window=2)
    tensors = _adapter(fleet, tiny_base4, seed=3)
    reference, lean = TorchBackend(tiny_base4, fleet), TorchWindowBackend(tiny_base4, mine)
    reference.set_adapter(tensors)
    window = {k: v for k, v in tensors.items() if ".layers.2." in k or ".layers.3." in k}
    lean.set_adapter(window)
    ids = np.random.default_rng(2).integers(0, 128, size=(4, 16))
    without = lean.loss(ids)  # the frozen base below the window
    # Execute
    lean.set_prefix_adapter({k: v for k, v in tensors.items() if k not in window})
    # Assert: the memo of prefix states was dropped; the fleet model's loss; B = 0 is no change
    assert lean.prefix_version == 1 and without != pytest.approx(reference.loss(ids), rel=1e-3)
    assert lean.loss(ids) == pytest.approx(reference.loss(ids), rel=1e-5)
    lean.set_prefix_adapter({k: v for k, v in tensors.items() if k not in window})
    assert lean.prefix_version == 1  # the same tensors again: the states stand
    lean.set_prefix_adapter({k: np.zeros_like(v) for k, v in tensors.items() if k not in window})
    assert lean.prefix_version == 2 and lean.loss(ids) == pytest.approx(without, rel=1e-6)


def test_bf16_is_close_and_tuning_lowers_the_loss(tiny_base4):
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    spec = LoraSpec(r=2, window=1)
    fp32, bf16 = (
        TorchWindowBackend(tiny_base4, spec),
        TorchWindowBackend(tiny_base4, spec, precision="bf16"),
    )
    cycle = np.tile(np.arange(16), 40)[:512].reshape(-1, 16)
    assert bf16.loss(cycle[:4]) == pytest.approx(fp32.loss(cycle[:4]), rel=2e-2)
    cache = build_cache(bf16, cycle)
    before = float(bf16.window_loss_tensor(cache.hidden[:8], cache.ids[:8]).detach())
    metrics = window_backprop(bf16, cache, steps=30, lr=5e-2, batch_size=4, seed=0)
    after = float(bf16.window_loss_tensor(cache.hidden[:8], cache.ids[:8]).detach())
    assert metrics["steps"] == 30 and after < 0.95 * before
    assert (
        bf16.head.dtype == torch.bfloat16
        and bf16._params[next(iter(bf16._params))].dtype == torch.float32
    )


def _against_fp32(base, precision):
    """The lean engine in fp32 and in ``precision``, a window of the top layer, one adapter."""
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    spec = LoraSpec(r=2, window=1)
    tensors = _adapter(spec, base)
    engines = TorchWindowBackend(base, spec), TorchWindowBackend(base, spec, precision=precision)
    for engine in engines:
        engine.set_adapter(tensors)
    return engines


def _weighted_backward(y):
    """Back-propagate a sum of ``y`` weighted by position (every output's gradient differs)."""
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()


def _assert_tunes(engine):
    """30 AdamW steps on a repeated sequence take its loss down by more than 5%."""
    cache = build_cache(engine, np.tile(np.arange(16), 40)[:512].reshape(-1, 16))
    before = float(engine.window_loss_tensor(cache.hidden[:8], cache.ids[:8]).detach())
    window_backprop(engine, cache, steps=30, lr=5e-2, batch_size=4, seed=0)
    after = float(engine.window_loss_tensor(cache.hidden[:8], cache.ids[:8]).detach())
    assert after < 0.95 * before


def test_int8_weights_are_the_dequantized_layers_and_their_backward_is_exact(tiny_base4):
    """precision = "int8": each layer's frozen weights stored as int8 with a scale per output
    row; the loss and gradients are those of the same layers with the dequantized weights
    (bf16 matmuls in both), within bf16's rounding of the fp32 engine, and no weight is kept
    in a float copy."""
    from fleetune.edge_sdk.backends.torch_window import Int8Linear

    fp32, int8 = _against_fp32(tiny_base4, "int8")
    ids = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    layer = int8.layers[3]
    assert {w.dtype for w in layer.weights.values()} == {torch.int8}
    assert int8.head.dtype == int8.embed.dtype == torch.int8  # the embedding table and head too
    # Int8Linear against autograd through the dequantized weight
    q, scale = layer.weights["q_proj"], layer.scales["q_proj"]
    x = torch.randn(5, q.shape[1], dtype=torch.bfloat16, requires_grad=True)
    y = Int8Linear.apply(x, q, scale)
    _weighted_backward(y)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, q.to(torch.bfloat16)).float() * scale
    _weighted_backward(ref)
    assert torch.equal(y, ref) and torch.allclose(x.grad.float(), ref_x.grad.float(), rtol=1e-2)
    # the engine: close to fp32 (weights within half a step of 1/127 of their row's largest)
    assert int8.loss(ids) == pytest.approx(fp32.loss(ids), rel=2e-2)
    _assert_tunes(int8)


def test_int4_groups_give_q4_1_values_back_and_the_engine_tunes_on_them(tiny_base4):
    """precision = "int4": a weight made of GGUF Q4_1 blocks (float16 scale and minimum per
    32 weights, codes 0..15) comes back exactly; Int4Linear's output and input gradient are
    those of the dequantized weight; the engine holds its layers in int4 (the table in int8),
    stays near fp32 on a random model and tunes."""
    from fleetune.edge_sdk.backends.torch_window import GROUP, Int4Linear, Int4Weight, quantize_int4

    gen = torch.Generator().manual_seed(0)
    rows, groups = 6, 3
    codes = torch.randint(0, 16, (rows, groups, GROUP), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0.0, 15.0  # each block spans its range, as Q4_1 writes it
    scale = (torch.rand(rows, groups, generator=gen) * 0.01 + 1e-3).half()
    low = (-torch.rand(rows, groups, generator=gen) * 0.08).half()
    weight = (codes * scale.float()[..., None] + low.float()[..., None]).view(rows, -1)
    codes, scale_back, low_back = quantize_int4(weight)
    assert torch.equal(scale_back, scale) and torch.equal(low_back, low)
    packed = Int4Weight(codes[: rows // 2] | (codes[rows // 2 :] << 4), scale_back, low_back)
    assert packed.shape == tuple(weight.shape) and packed.packed.numel() == weight.numel() // 2
    assert torch.equal(packed.dequantize(torch.float32), weight)
    x = torch.randn(5, weight.shape[1], dtype=torch.bfloat16, requires_grad=True)
    y = Int4Linear.apply(x, packed)
    _weighted_backward(y)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, weight.to(torch.bfloat16)).float()
    _weighted_backward(ref)
    assert torch.equal(y, ref) and torch.equal(x.grad, ref_x.grad)

    fp32, int4 = _against_fp32(tiny_base4, "int4")
    assert all(isinstance(w, Int4Weight) for w in int4.layers[3].weights.values())
    assert int4.head.dtype == torch.int8
    ids = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    assert int4.loss(ids) == pytest.approx(fp32.loss(ids), rel=5e-2)
    _assert_tunes(int4)


def test_the_int8_heads_loss_and_gradient_are_cross_entropy_through_the_dequantized_head(
    monkeypatch,
):
    """Int8HeadLoss goes through the vocabulary in slabs (online log-sum-exp, then the softmax
    again for the gradient): the same loss and input gradient as autograd through
    ``cross_entropy(x @ (q * scale).T)``, across several slabs and a last partial one."""
    from fleetune.edge_sdk.backends import torch_window
    from fleetune.edge_sdk.backends.torch_window import Int8HeadLoss, Int8Table, quantize_int8

    gen = torch.Generator().manual_seed(0)
    table = Int8Table(*quantize_int8(torch.randn(1000, 24, generator=gen)))
    x = torch.randn(12, 24, generator=gen, requires_grad=True)
    labels = torch.randint(0, 1000, (12,), generator=gen)
    monkeypatch.setattr(torch_window, "VOCAB_SLAB", 128)  # 8 slabs, the last of 104
    loss = Int8HeadLoss.apply(x, table, labels, torch.float32)
    (loss * 3.0).backward()
    ref_x = x.detach().clone().requires_grad_(True)
    head = table.q.float() * table.scale[:, None]
    ref = torch.nn.functional.cross_entropy(ref_x @ head.T, labels)
    (ref * 3.0).backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(table.lookup(labels[:3]), head[labels[:3]])


def test_refusals_name_the_problem(tiny_base4, tmp_path):
    from fleetune.edge_sdk.backends import load_backend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    with pytest.raises(ConfigError, match="needs lora_window"):
        TorchWindowBackend(tiny_base4, LoraSpec(r=2))
    with pytest.raises(ConfigError, match="'int2' is not one of"):
        TorchWindowBackend(tiny_base4, LoraSpec(r=2, window=1), precision="int2")
    with pytest.raises(ConfigError, match="for layer windows only"):
        load_backend("torch", LoraSpec(r=2), base=tiny_base4, precision="bf16")
    assert isinstance(
        load_backend("torch", LoraSpec(r=2, window=1), base=tiny_base4), TorchWindowBackend
    )
    from dataclasses import replace

    from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, TuningConfig

    for precision in ("bf16", "int8", "int4"):
        with pytest.raises(ConfigError, match=rf'{precision}.*not tuner = "zo"'):
            FleetuneConfig(
                device=DeviceConfig(precision=precision),
                tuning=TuningConfig(tuner="zo", lora_window=2),
            )
    with pytest.raises(BackendError, match="no safetensors checkpoint"):
        TorchWindowBackend(replace(tiny_base4, hf_dir=str(tmp_path)), LoraSpec(r=2, window=1))
    # a checkpoint cut short, and one whose layers are not plain llama layers
    import json
    import shutil
    from pathlib import Path

    source = Path(tiny_base4.hf_dir)
    for name in ("short", "biased"):
        shutil.copytree(source, tmp_path / name)
    weights = (tmp_path / "short" / "model.safetensors").read_bytes()
    (tmp_path / "short" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(BackendError, match="truncated"):
        TorchWindowBackend(
            replace(tiny_base4, hf_dir=str(tmp_path / "short")), LoraSpec(r=2, window=1)
        )
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "biased" / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(BackendError, match="mlp_bias = True: use the transformers engine"):
        TorchWindowBackend(
            replace(tiny_base4, hf_dir=str(tmp_path / "biased")), LoraSpec(r=2, window=1)
        )


def test_adamw_is_torchs_update():
    from fleetune.edge_sdk.tuners.backprop import AdamW

    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    mine, reference = (
        AdamW([ours], lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1),
    )
    for _ in range(25):
        grad = torch.randn(64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    kept = ours.grad
    mine.zero_grad()  # zeroed in place, not allocated again
    assert ours.grad is kept and not kept.any()


def test_the_lean_engine_imports_neither_transformers_nor_torch_optim(tiny_base4):
    code = (
        "import sys, numpy as np\n"
        "from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend\n"
        "from fleetune.edge_sdk.adapters.lora import LoraSpec\n"
        "from fleetune.edge_sdk.manifest import BaseManifest\n"
        "from fleetune.edge_sdk.tuners.window import build_cache, window_backprop\n"
        f"base = BaseManifest(**{tiny_base4.__dict__!r})\n"
        "engine = TorchWindowBackend(base, LoraSpec(r=2, window=1))\n"
        "ids = np.random.default_rng(0).integers(0, 128, size=(8, 16))\n"
        "window_backprop(engine, build_cache(engine, ids), 2, 1e-3, 4, 0)\n"
        "print(sorted(m for m in ('transformers', 'peft', 'torch._dynamo') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
