import numpy as np
import pytest

from fleetune.edge_sdk import codec
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora
from fleetune.edge_sdk.adapters.lora.flat import FlatLayout
from fleetune.edge_sdk.data import split_validation
from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.protocol import Fleet, MixtureUpload, Prior
from fleetune.edge_sdk.tuners.mix import (
    BASIS_PART,
    Basis,
    MixConfig,
    Mixer,
    engine_loss,
    tune_mix,
)
from fleetune.server.basis import kmeans
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.unit
SPEC = LoraSpec(r=2)


def random_basis(base, k, seed=0, scale=0.1):
    size = FlatLayout(SPEC, base).indices(BASIS_PART).size
    vectors = np.random.default_rng(seed).normal(0, scale, (k, size)).astype(np.float32)
    return Basis(3, vectors, SPEC, base.sha256)


def test_the_mix_is_the_weighted_sum_of_the_basis_per_layer_group():
    # Prepare: 4 layers in 2 groups, 3 basis adapters
    base = tiny_manifest(layers=4)
    basis = random_basis(base, 3)
    mixer = Mixer(basis, base, groups=2)
    coef = np.array([[0.5, -1.0], [2.0, 0.0], [0.25, 1.5]], np.float32)
    # Execute
    mixed = mixer.adapter(coef)
    # Assert: every B is sum_k c[k, group(layer)] B_k; every A is the shared init
    init = init_lora(SPEC, base)
    pieces = [Mixer(basis, base).adapter(np.eye(3, dtype=np.float32)[k]) for k in range(3)]
    for name, value in mixed.items():
        if ".lora_A." in name:
            assert np.array_equal(value, init[name])
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        expect = sum(coef[k, layer // 2] * pieces[k][name] for k in range(3))
        np.testing.assert_allclose(value, expect, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("layers", "groups"), [(5, 3), (30, 4), (7, 7)])
def test_llamacpp_pieces_cover_the_same_layers_as_the_mixed_vector(layers, groups):
    # Prepare: group sizes that do not divide the layer count (30 layers in 4 groups: SmolLM2)
    base = tiny_manifest(layers=layers)
    basis = random_basis(base, 2)
    mixer = Mixer(basis, base, groups=groups)
    coef = np.arange(1, 2 * groups + 1, dtype=np.float32).reshape(2, groups)
    # Execute: what llama.cpp computes, piece k restricted to its layers, scaled by c[k, g]
    summed: dict[str, np.ndarray] = {}
    for i, (piece, piece_layers) in enumerate(mixer.pieces()):
        for name, value in piece.items():
            layer = int(name.split(".layers.")[1].split(".")[0])
            if ".lora_B." in name and layer in piece_layers:
                summed[name] = summed.get(name, 0) + coef.reshape(-1)[i] * value
    # Assert: every layer is in exactly one group, and it is the group the flat vector uses
    mixed = mixer.adapter(coef)
    assert sorted(layer for group in mixer.layers for layer in group) == list(range(layers))
    for name, value in summed.items():
        np.testing.assert_allclose(value, mixed[name], rtol=1e-6, atol=1e-7)


def test_a_basis_of_one_with_coefficient_one_is_that_adapter_exactly():
    base = tiny_manifest()
    layout = FlatLayout(SPEC, base)
    adapter = init_lora(SPEC, base)
    rng = np.random.default_rng(1)
    for name in adapter:
        if ".lora_B." in name:
            adapter[name] = rng.normal(0, 0.3, adapter[name].shape).astype(np.float32)
    vector = layout.flatten(adapter)[layout.indices(BASIS_PART)]
    mixed = Mixer(Basis(1, vector[None], SPEC, base.sha256), base).adapter(np.ones((1, 1)))
    assert all(np.array_equal(mixed[k], adapter[k]) for k in adapter)


def test_a_basis_for_another_base_or_adapter_is_refused_by_name():
    base = tiny_manifest()
    other = Basis(1, random_basis(base, 2).vectors, SPEC, "cd" * 32)
    with pytest.raises(ConfigError, match="basis v1 is for base cdcdcdcdcdcd"):
        Mixer(other, base)
    with pytest.raises(ConfigError, match="holds"):
        random_basis(base, 2).check(LoraSpec(r=4), base)
    short = Basis(1, np.zeros((2, 5), np.float32), SPEC, base.sha256)
    with pytest.raises(PayloadError, match=r"expected \[K >= 1"):
        Mixer(short, base)


def test_coefficients_of_the_wrong_shape_or_size_are_refused():
    base = tiny_manifest()
    mixer = Mixer(random_basis(base, 2), base)
    for bad in (np.ones(3), np.array([1.0, np.nan]), np.array([1e6, 0.0])):
        with pytest.raises(PayloadError):
            mixer.flat(bad)


def test_basis_envelope_round_trip_and_junk():
    base = tiny_manifest()
    basis = Basis(4, random_basis(base, 3).vectors, SPEC, base.sha256, np.array([0.2, 0.3, 0.5]))
    back = Basis.decode(basis.encode(round_=2, encoding="f32"))
    assert back.version == 4 and back.spec == SPEC and back.base_sha256 == base.sha256
    assert np.array_equal(back.vectors, basis.vectors)
    np.testing.assert_allclose(back.prior, [0.2, 0.3, 0.5])
    np.testing.assert_allclose(back.start(2), [[0.2, 0.2], [0.3, 0.3], [0.5, 0.5]], rtol=1e-6)
    q8 = Basis.decode(basis.encode())
    np.testing.assert_allclose(q8.vectors, basis.vectors, atol=np.abs(basis.vectors).max() / 100)
    with pytest.raises(PayloadError, match="not a fleetune envelope"):
        Basis.decode(b"garbage!" * 4)
    header = codec.Header("adapter", "server", 1, base.sha256, SPEC.to_dict(), "f32")
    with pytest.raises(PayloadError, match="expected a basis envelope"):
        Basis.decode(codec.encode(header, {"basis": basis.vectors}))


def test_mixture_upload_is_under_a_kilobyte_for_k8():
    base = tiny_manifest()
    basis = random_basis(base, 8)
    upload = MixtureUpload(
        "device-12", basis.version, np.full((8, 1), 0.125), 120, 3.3, {"val_loss": 3.21}
    )
    payload = upload.encode(Fleet(base, SPEC))
    assert len(payload) < 1024
    back = MixtureUpload.decode(payload, Fleet(base, SPEC))
    assert (back.sender, back.basis_version, back.coef.shape) == ("device-12", 3, (8, 1))
    assert back.heldout_loss == pytest.approx(3.3) and back.metrics == {"val_loss": 3.21}


def test_kmeans_separates_clusters_and_keeps_few_points_as_they_are():
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    points = np.concatenate([c + rng.normal(0, 0.1, (5, 3)) for c in centers])
    found, labels = kmeans(points, 3)
    assert len(set(labels[:5])) == len(set(labels[5:10])) == len(set(labels[10:])) == 1
    assert len(set(labels)) == 3
    np.testing.assert_allclose(np.sort(found.sum(axis=1)), [10, 10, 10], atol=0.2)
    same, labels = kmeans(points[:2], 8)
    assert np.array_equal(same, points[:2].astype(np.float32)) and labels.tolist() == [0, 1]
    with pytest.raises(ConfigError):
        kmeans(np.zeros((0, 3)), 2)


def test_search_finds_the_basis_adapter_that_fits(tiny_base):
    """Constructed case: one basis adapter was trained on the client's text, two are noise."""
    from fleetune.edge_sdk.backends.torch import TorchBackend
    from fleetune.edge_sdk.tuners.backprop import tune_backprop

    # Prepare: a client whose text is a repeating token pattern
    backend = TorchBackend(tiny_base, SPEC)
    pattern = np.tile(np.arange(5, 21), 64)
    windows = np.stack([np.roll(pattern, s)[:32] for s in range(40)])
    train, val = split_validation(windows)
    backend.set_adapter(init_lora(SPEC, tiny_base))
    tune_backprop(backend, train, 40, 3e-2, 4, 0, params=BASIS_PART)
    layout = FlatLayout(SPEC, tiny_base)
    good = layout.flatten(backend.get_adapter())[layout.indices(BASIS_PART)]
    assert np.array_equal(  # B-only backprop left A at the shared init
        layout.flatten(backend.get_adapter())[layout.indices("lora_a")],
        layout.flatten(init_lora(SPEC, tiny_base))[layout.indices("lora_a")],
    )
    noise = np.random.default_rng(0).normal(0, np.abs(good).mean(), (2, good.size))
    basis = Basis(1, np.vstack([noise[0], good, noise[1]]).astype(np.float32), SPEC, "ab" * 32)
    mixer = Mixer(basis, tiny_base)
    loss = engine_loss(backend, mixer)

    def validate(coef):
        return loss(val, coef)

    # Execute: from the plain average of the three
    coef, metrics = tune_mix(
        lambda c, s: loss(train, c),
        validate,
        basis.start(1),
        MixConfig(steps=60, lr=0.3, eps=0.05),
        np.random.default_rng(1),
    )
    # Assert: most of the way from the average (4.84) to the trained adapter alone (4.67)
    assert metrics["val_loss"] < metrics["val_loss_start"] - 0.1
    assert int(np.argmax(coef[:, 0])) == 1
    assert validate(coef) == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_a_prior_is_read_or_refused_by_name():
    prior = Prior.decode(b'{"version": 3, "prior": [0.5, 0.25], "devices": 2}')
    assert prior.version == 3 and prior.prior.tolist() == [0.5, 0.25]
    for junk in (b"nope", b'{"prior": [1]}', b'{"version": 1, "prior": [1e9]}', b"[1, 2]"):
        with pytest.raises(PayloadError, match="basis prior"):
            Prior.decode(junk)


def test_a_search_with_a_time_budget_starts_no_chunk_that_would_not_fit(monkeypatch):
    # Prepare: a clock that moves 1 s per loss, so a chunk of 5 steps (10 losses and a
    # validation) takes 11 s; the budget fits the first validation and two chunks, not three
    import fleetune.edge_sdk.tuners.mix as mix

    now = [0.0]

    def tick(value: float) -> float:
        now[0] += 1.0
        return value

    monkeypatch.setattr(mix.time, "monotonic", lambda: now[0])
    config = MixConfig(steps=1000, lr=0.1, eps=0.1, eval_every=5, patience=10**6, seconds=30)
    # Execute
    _, metrics = tune_mix(
        lambda c, s: tick(float(np.sum((c - 1.0) ** 2))),
        lambda c: tick(float(np.sum((c - 1.0) ** 2))),
        np.zeros((2, 1), np.float32),
        config,
        np.random.default_rng(0),
    )
    # Assert: 1 + 11 + 11 = 23 s spent; a third chunk would end at 34 > 30
    assert metrics["steps"] == 10
    assert metrics["seconds"] == 23.0
    with pytest.raises(ConfigError, match="seconds"):
        MixConfig(seconds=0)
