"""Engine edges that need no weights: malformed ONNX manifests, generation with an explicit
adapter on a toy graph, llama.cpp's native-call error paths on a fake binding, GGUF export's
file handling and ``fleetune export gguf --adapter``."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, save_peft
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.bundle import Bundle
from fleetune.edge_sdk.errors import BackendError, ConfigError, PayloadError
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit

WORDS = ["zero", "one", "two", "three", "four"]


# ONNX: bundle loading and generate(prompt, adapter=...)


def _onnx_manifest(base=None, spec=None) -> dict:
    base, spec = base or tiny_manifest(), spec or LoraSpec()
    layout = FlatLayout(spec, base)
    return {
        "schema": 1,
        "format": "onnx",
        "base": json.loads(base.to_json()),
        "adapter": spec.to_dict(),
        "size": layout.size,
        "layout": [{"name": n, "shape": list(s), "offset": o} for n, s, o in layout.entries],
        "files": {"fp32": "toy.onnx", "decoder": "toy.onnx"},
        "tokenizer": "tokenizer.json",
        "eos_token_id": None,
    }


def _write_toy_artifacts(root: Path) -> Path:
    """A decoder graph whose next-token logits are ``adapter[:len(WORDS)]``, whatever the input,
    and a word-level tokenizer over ``WORDS``."""
    onnx = pytest.importorskip("onnx")
    tokenizers = pytest.importorskip("tokenizers")
    from onnx import TensorProto, helper

    vocab = len(WORDS)
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["adapter", "starts", "ends"], ["head"], name="take_vocab"),
            helper.make_node("Reshape", ["head", "shape"], ["logits"], name="as_logits"),
        ],
        "toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "T"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "S"]),
            helper.make_tensor_value_info("adapter", TensorProto.FLOAT, ["N"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab])],
        initializer=[
            helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
            helper.make_tensor("ends", TensorProto.INT64, [1], [vocab]),
            helper.make_tensor("shape", TensorProto.INT64, [3], [1, 1, vocab]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "toy.onnx"))
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="zero")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(root / "tokenizer.json"))
    (root / "fleetune-bundle.json").write_text(json.dumps(_onnx_manifest()))
    return root


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m.pop("layout"), "'layout'"),
        (lambda m: m["layout"][0].pop("offset"), "'offset'"),
        (lambda m: m["base"].pop("sha256"), "sha256"),
        (lambda m: m.update(size="many"), "many"),
        (lambda m: m.update(layout=7), "int"),
        (lambda m: m.update(schema=2), "schema 2"),
    ],
)
def test_malformed_bundle_manifest_is_a_config_error_naming_file_and_problem(tmp_path, edit, named):
    # Prepare
    manifest = _onnx_manifest()
    edit(manifest)
    (tmp_path / "fleetune-bundle.json").write_text(json.dumps(manifest))
    # Execute
    with pytest.raises(ConfigError) as err:
        Bundle.load(tmp_path)
    # Assert
    assert "fleetune-bundle.json" in str(err.value)
    assert named in str(err.value)


def test_bundle_manifest_that_is_not_an_object_is_a_config_error(tmp_path):
    (tmp_path / "fleetune-bundle.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        Bundle.load(tmp_path)


def test_well_formed_bundle_manifest_loads_and_checks_its_layout(tmp_path):
    (tmp_path / "fleetune-bundle.json").write_text(json.dumps(_onnx_manifest()))
    bundle = Bundle.load(tmp_path, "onnx")
    bundle.check(tiny_manifest(), LoraSpec())
    assert bundle.base.hf_dir == ""  # no path of the exporting machine
    with pytest.raises(ConfigError, match="holds a onnx bundle, this device needs gguf"):
        Bundle.load(tmp_path, "gguf")
    with pytest.raises(ConfigError, match=r"takes a .* adapter input, the device tunes"):
        bundle.check(spec=LoraSpec(r=4))


def test_onnx_generate_uses_the_given_adapter_and_validates_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from fleetune.edge_sdk.backends.onnx import OnnxBackend

    # Prepare
    root = _write_toy_artifacts(tmp_path)
    with OnnxBackend(root) as engine:
        adapter = np.zeros(engine.layout.size, dtype=np.float32)
        adapter[3] = 1.0  # the toy graph's next token is argmax(adapter[:5]): "three"
        # Execute
        current = engine.generate("one two", max_new_tokens=2)
        given = engine.generate("one two", max_new_tokens=2, adapter=adapter)
        # Assert
        assert current == "zero zero"  # the current adapter (zeros) is left alone
        assert given == "three three"
        with pytest.raises(PayloadError, match="float32 of length"):
            engine.generate("one", adapter=adapter[:-1])
        with pytest.raises(PayloadError, match="float32"):
            engine.generate("one", adapter=adapter.astype(np.float64))


def test_onnx_backend_close_is_idempotent_and_later_calls_fail_cleanly(tmp_path):
    pytest.importorskip("onnxruntime")
    from fleetune.edge_sdk.backends.onnx import OnnxBackend

    engine = OnnxBackend(_write_toy_artifacts(tmp_path))
    with engine:
        pass
    engine.close()
    with pytest.raises(BackendError, match="closed"):
        engine.generate("one")
    with pytest.raises(BackendError, match="closed"):
        engine.loss(np.zeros((1, 2), dtype=np.int64))


def test_export_onnx_treats_a_malformed_manifest_as_stale(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from fleetune.models import onnx as onnx_export
    from fleetune.models.onnx import graphs

    # Prepare: a manifest missing its keys, and graph builders that only record their calls
    (tmp_path / "fleetune-bundle.json").write_text(json.dumps({"schema": 1}))
    built: list[str] = []

    def fake(name):
        def build(hf_dir, path, layout):
            built.append(name)
            Path(path).write_bytes(b"graph")

        return build

    monkeypatch.setattr(graphs, "export_loss_graph", fake("fp32"))
    monkeypatch.setattr(graphs, "export_decoder_graph", fake("dec"))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text("{}")
    (hf_dir / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    # Execute
    onnx_export.export_onnx(
        tiny_manifest(str(hf_dir)), LoraSpec(), tmp_path, graphs=("fp32", "decoder")
    )
    # Assert
    assert built == ["fp32", "dec"]
    assert json.loads((tmp_path / "fleetune-bundle.json").read_text())["files"] == {
        "fp32": "loss_fp32.onnx",
        "decoder": "decoder_fp32.onnx",
    }


# llama.cpp: native-call edges on a fake binding


class FakeLlama:
    """The few llama_cpp functions generate/detokenize/_load_lora call, over a byte vocabulary."""

    llama_token = ctypes.c_int32

    def __init__(self, n_vocab: int = 300, next_token: int = 65, pieces=None, null_logits=False):
        self.row = (ctypes.c_float * n_vocab)()
        self.row[next_token] = 1.0
        self.pieces = pieces or {}
        self.null_logits = null_logits
        self.decoded: list[list[int]] = []

    def llama_tokenize(self, vocab, data, n, buf, size, add_special, parse_special):
        if n > size:
            return -n
        for i, byte in enumerate(data):
            buf[i] = byte
        return n

    def llama_token_to_piece(self, vocab, token, buf, length, lstrip, special):
        piece = self.pieces.get(token, bytes([token % 256]))
        if len(piece) > length:
            return -len(piece)
        ctypes.memmove(buf, piece, len(piece))
        return len(piece)

    def llama_memory_clear(self, memory, data):
        pass

    def llama_decode(self, ctx, batch):
        self.decoded.append(list(batch.pos[: batch.n_tokens]))
        return 0

    def llama_get_logits_ith(self, ctx, i):
        if self.null_logits:
            return ctypes.POINTER(ctypes.c_float)()
        return ctypes.cast(self.row, ctypes.POINTER(ctypes.c_float))

    def llama_vocab_is_eog(self, vocab, token):
        return False

    def llama_adapter_lora_init(self, model, path):
        return 1

    def llama_batch_free(self, batch):
        pass

    def llama_free(self, ctx):
        pass

    def llama_model_free(self, model):
        pass


def _bare_llama(lib: FakeLlama, n_ctx: int = 8):
    """A LlamaCppBackend over ``lib``, without loading anything."""
    from fleetune.edge_sdk.backends.llamacpp import LlamaCppBackend

    engine = object.__new__(LlamaCppBackend)
    base, spec = tiny_manifest(), LoraSpec()
    engine.lib, engine.base, engine.spec = lib, base, spec
    engine.layout = FlatLayout(spec, base)
    engine.path = Path("fake.gguf")
    engine.model, engine.ctx, engine.vocab, engine._memory = "model", "ctx", "vocab", "memory"
    engine.batch = SimpleNamespace(
        n_tokens=0,
        token=[0] * n_ctx,
        pos=[0] * n_ctx,
        n_seq_id=[0] * n_ctx,
        seq_id=[[0] for _ in range(n_ctx)],
        logits=[0] * n_ctx,
    )
    engine._adapter, engine._pieces, engine._tensors, engine._scale = None, [], None, 1.0
    engine.n_ctx, engine.n_vocab, engine.n_layer, engine.n_embd = n_ctx, len(lib.row), 2, 32
    return engine


def test_llamacpp_generate_keeps_the_last_token_when_the_context_fills():
    # Prepare: a 4-token context, a 2-token prompt, a model that always predicts "A"
    lib = FakeLlama(next_token=ord("A"))
    engine = _bare_llama(lib, n_ctx=4)
    # Execute
    text = engine.generate("ab", max_tokens=10)
    # Assert: positions 0..3 decoded, and the token predicted at position 3 is kept
    assert lib.decoded == [[0, 1], [2], [3]]
    assert text == "AAA"


def test_llamacpp_generate_stops_at_max_tokens_before_the_context_fills():
    lib = FakeLlama(next_token=ord("A"))
    engine = _bare_llama(lib, n_ctx=64)
    assert engine.generate("ab", max_tokens=2) == "AA"
    assert lib.decoded == [[0, 1], [2]]


def test_llamacpp_null_logits_are_a_backend_error():
    engine = _bare_llama(FakeLlama(null_logits=True))
    with pytest.raises(BackendError, match="llama_get_logits_ith returned NULL"):
        engine.generate("ab")


def test_llamacpp_detokenize_grows_the_buffer_for_long_pieces():
    engine = _bare_llama(FakeLlama(pieces={7: b"x" * 1000, 8: "é".encode()}))
    assert engine.detokenize([8, 7, 8]) == "é" + "x" * 1000 + "é"


def test_llamacpp_closed_backend_refuses_to_decode():
    engine = _bare_llama(FakeLlama())
    engine.close()
    engine.close()
    with pytest.raises(BackendError, match="closed"):
        engine.generate("ab")
    with pytest.raises(BackendError, match="closed"):
        engine.detokenize([65])
    with pytest.raises(BackendError, match="closed"):
        engine.set_adapter(init_lora(engine.spec, engine.base))


def test_llamacpp_adapter_write_failure_is_a_backend_error(tmp_path, monkeypatch):
    import fleetune.edge_sdk.backends.llamacpp as llamacpp

    # Prepare: a RAM dir that is "full"
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(llamacpp, "_ram_dir", lambda: str(tmp_path))
    monkeypatch.setattr(llamacpp, "write_lora_gguf", full_disk)
    engine = _bare_llama(FakeLlama())
    # Execute / Assert
    with pytest.raises(BackendError, match="No space left"):
        engine.set_adapter(init_lora(engine.spec, engine.base))
    assert list(tmp_path.iterdir()) == []  # the half-written file is gone


# GGUF export: the packaged file as is, no truncated f16 or quantized output


def _gguf_file(path: Path, file_type: int) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _base_from(source: Path, hf_dir: str = ""):
    base = tiny_manifest(hf_dir)
    return type(base)(**{**base.__dict__, "source": str(source)})


def test_packaged_q4_1_source_is_exported_as_is(tmp_path):
    from fleetune.models.gguf_export import export_base_gguf, source_gguf

    # Prepare: a base whose source GGUF is Q4_1 (llama_ftype 3) and no HF copy to convert
    source = _gguf_file(tmp_path / "packaged.Q4_1.gguf", 3)
    base = _base_from(source)
    # Execute
    as_is = export_base_gguf(base, "q4_1")
    copied = export_base_gguf(base, "q4_1", out_dir=tmp_path / "out")
    # Assert
    assert as_is == source
    assert copied.parent == tmp_path / "out"
    assert copied.read_bytes() == source.read_bytes()
    assert source_gguf(base, "q8_0") is None
    assert source_gguf(_base_from(tmp_path / "missing.gguf"), "q4_1") is None


def test_failed_conversion_or_quantization_leaves_no_output(tmp_path, monkeypatch):
    import fleetune.models.gguf_export as gguf_export

    # Prepare: a converter that writes its output, then a tokenizer step that fails
    source = _gguf_file(tmp_path / "packaged.Q4_1.gguf", 3)
    converter = tmp_path / "convert_hf_to_gguf.py"
    converter.write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF' * 8)\n"
    )
    out = tmp_path / "out"
    base = _base_from(source, hf_dir=str(tmp_path))

    def broken_adopt(converted, src, dst):
        Path(dst).write_bytes(b"GGUF")  # a truncated write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "adopt_tokenizer", broken_adopt)
    # Execute / Assert: no f16 that a later run would take for a finished one
    with pytest.raises(OSError, match="disk full"):
        gguf_export.export_base_gguf(base, "q8_0", out_dir=out, converter=converter)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []

    # Prepare: a working tokenizer step, then a quantizer that fails half-way
    monkeypatch.setattr(
        gguf_export, "adopt_tokenizer", lambda converted, src, dst: Path(dst).write_bytes(b"GGUF")
    )

    def broken_quantize(src, dst, quant, threads=1):
        Path(dst).write_bytes(b"GG")
        raise BackendError("llama_model_quantize returned 1")

    monkeypatch.setattr(gguf_export, "quantize_gguf", broken_quantize)
    # Execute / Assert: the f16 is kept, no partial q8_0 and no .tmp
    with pytest.raises(BackendError):
        gguf_export.export_base_gguf(base, "q8_0", out_dir=out, converter=converter)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == [f"tiny-{base.short_hash}-f16.gguf"]


# fleetune export gguf --adapter


def test_cli_export_gguf_adapter_arguments_parse():
    from fleetune.cli import build_parser

    args = build_parser().parse_args(["export", "gguf", "--adapter", "ad", "--out", "a.gguf"])
    assert (args.format, args.adapter, args.out) == ("gguf", "ad", "a.gguf")
    assert build_parser().parse_args(["export", "gguf"]).adapter is None


def test_cli_export_gguf_adapter_writes_a_llama_cpp_lora(tmp_path, monkeypatch, capsys):
    gguf = pytest.importorskip("gguf")
    from fleetune.cli import main

    # Prepare: a fleetune adapter for the tiny base, saved as PEFT files
    base, spec = tiny_manifest(), LoraSpec()
    save_peft(tmp_path / "adapter", init_lora(spec, base), spec, base)
    monkeypatch.setattr("fleetune.models.base.prepare_base", lambda name: base)
    out = tmp_path / "gguf" / "me.gguf"
    # Execute
    rc = main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(out)])
    # Assert
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    reader = gguf.GGUFReader(out)
    assert reader.fields["adapter.type"].contents() == "lora"
    assert len(reader.tensors) == base.num_layers * len(spec.targets) * 2


def test_cli_export_adapter_of_another_base_or_for_onnx_is_refused(tmp_path, monkeypatch, capsys):
    from fleetune.cli import main

    base, spec = tiny_manifest(), LoraSpec()
    other = type(base)(**{**base.__dict__, "sha256": "cd" * 32})
    save_peft(tmp_path / "adapter", init_lora(spec, other), spec, other)
    monkeypatch.setattr("fleetune.models.base.prepare_base", lambda name: base)
    assert main(["export", "gguf", "--adapter", str(tmp_path / "adapter")]) == 2
    assert "belongs to base" in capsys.readouterr().err
    assert main(["export", "onnx", "--adapter", str(tmp_path / "adapter")]) == 2
    assert "use `export gguf`" in capsys.readouterr().err
    assert not (tmp_path / "adapter" / "adapter_model.gguf").exists()


# the llama.cpp window model: a GGUF of the top layers, written by streaming the base's


def test_a_window_gguf_holds_the_top_layers_renumbered_and_everything_else_as_is(tmp_path):
    gguf = pytest.importorskip("gguf")
    from fleetune.edge_sdk.backends.llamacpp_window import write_window_gguf

    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.normal(size=(5, 4)).astype(np.float32)}
    for layer in range(3):  # odd sizes: the writer pads every tensor to the alignment
        tensors[f"blk.{layer}.attn_q.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
        tensors[f"blk.{layer}.ffn_norm.weight"] = np.full(7, layer, dtype=np.float16)
    writer = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")
    writer.add_block_count(3)
    writer.add_token_list(["<s>", "a", "bé"])
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = write_window_gguf(tmp_path / "base.gguf", 1, tmp_path / "window.gguf")
    reader = gguf.GGUFReader(out)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.tokens"] == ["<s>", "a", "bé"]
    assert fields["llama.rope.freq_base"] == 10000.0
    got = {
        t.name: np.asarray(t.data).reshape(tensors[_source(t.name)].shape) for t in reader.tensors
    }
    assert sorted(got) == sorted(_window(name) for name in tensors if _keeps(name))
    for name, data in got.items():
        assert np.array_equal(data, tensors[_source(name)]), name

    with pytest.raises(ConfigError, match=r"a window from layer 3 of .* 3 layers"):
        write_window_gguf(tmp_path / "base.gguf", 3, tmp_path / "none.gguf")
    (tmp_path / "short.gguf").write_bytes((tmp_path / "base.gguf").read_bytes()[:40])
    with pytest.raises(BackendError, match="ends inside its GGUF header"):
        write_window_gguf(tmp_path / "short.gguf", 1, tmp_path / "none.gguf")


def _keeps(name: str) -> bool:
    return not name.startswith("blk.0.")


def _window(name: str) -> str:  # a kept base tensor's name in the window model
    parts = name.split(".", 2)
    return f"blk.{int(parts[1]) - 1}.{parts[2]}" if parts[0] == "blk" else name


def _source(name: str) -> str:  # a window tensor's name in the base
    parts = name.split(".", 2)
    return f"blk.{int(parts[1]) + 1}.{parts[2]}" if parts[0] == "blk" else name
