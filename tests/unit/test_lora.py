import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora, load_peft, save_peft
from fleetune.edge_sdk.adapters.lora.io import check_layout
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit


def test_layout_of_smollm2_shapes_matches_peft_count():
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 kv heads of 64 → 460,800 LoRA r=8 q,v params
    base = tiny_manifest()
    base = type(base)(
        **{
            **base.__dict__,
            "num_layers": 30,
            "hidden_size": 576,
            "num_heads": 9,
            "num_kv_heads": 3,
            "head_dim": 64,
            "intermediate_size": 1536,
        }
    )
    spec = LoraSpec()
    assert spec.num_params(base) == 460_800
    names = [n for n, _ in spec.layout(base)]
    assert names[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert names[3] == "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"


def test_init_is_deterministic_and_starts_at_the_base():
    base, spec = tiny_manifest(), LoraSpec(r=2)
    a, b = init_lora(spec, base), init_lora(spec, base)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)
    other = init_lora(LoraSpec(r=2, init_seed=1), base)
    assert not np.array_equal(a[next(iter(a))], other[next(iter(other))])


def test_peft_files_round_trip(tmp_path):
    base, spec = tiny_manifest(), LoraSpec(r=2)
    tensors = init_lora(spec, base)
    save_peft(tmp_path, tensors, spec, base)
    loaded, loaded_spec = load_peft(tmp_path, base)
    assert loaded_spec == spec
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)


def test_adapter_for_another_base_is_refused(tmp_path):
    base, spec = tiny_manifest(), LoraSpec(r=2)
    save_peft(tmp_path, init_lora(spec, base), spec, base)
    other = type(base)(**{**base.__dict__, "sha256": "cd" * 32, "name": "other"})
    with pytest.raises(PayloadError, match="belongs to base abababababab"):
        load_peft(tmp_path, other)


def test_check_layout_names_the_bad_tensor():
    base, spec = tiny_manifest(), LoraSpec(r=2)
    tensors = init_lora(spec, base)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:, :3]
    with pytest.raises(PayloadError, match=f"{name} has shape"):
        check_layout(tensors, spec, base)
    del tensors[name]
    with pytest.raises(PayloadError, match="1 missing"):
        check_layout(tensors, spec, base)


@pytest.mark.parametrize(
    "kw", [{"r": 0}, {"alpha": -1}, {"targets": ()}, {"targets": ("q_proj", "q_proj")}]
)
def test_bad_spec_is_a_config_error(kw):
    with pytest.raises(ConfigError):
        LoraSpec(**kw)


def test_unknown_target_module_is_named():
    with pytest.raises(ConfigError, match="unknown target module 'qkv'"):
        LoraSpec(targets=("qkv",)).layout(tiny_manifest())
