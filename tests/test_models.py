"""The networks: blocks against PyTorch semantics, plan → architecture, initialisation, parameter
counts of the reference, every variant's forward pass, precision switch, memory preflight."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_plan
from flax import nnx

from jaxmamba.layers import MambaOptions
from jaxmamba.layers.conv import (
    AvgPool,
    BasicBlockD,
    ConvNormAct,
    InstanceNorm,
    TransposedConv,
    conv3d,
)
from jaxmamba.models import (
    VARIANTS,
    ResidualEncoder,
    build_model,
    count_parameters,
)
from jaxmamba.plans import Plan, PlanError
from jaxmamba.train.preflight import memory_preflight

DATASETS = {"synapse": "Dataset090_SynapseAbdomen", "brats": "Dataset001_BrainTumour"}
HE_GAIN = math.sqrt(2.0 / (1.0 + 1e-4))


def small_plan(**changes) -> Plan:
    """3 stages, features 4/8/8, anisotropic first stage: every code path at a few voxels."""
    plan = tiny_plan(dataset_name="small", patch_size=(4, 8, 8),
                     normalization_schemes=("ZScoreNormalization",) * 2,
                     use_mask_for_norm=(False,) * 2, strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                     kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), n_blocks_encoder=(1, 2, 1),
                     n_blocks_decoder=(1, 2), channel_names=("T1", "T2"))
    return plan.replace(**changes)


def mini_plan() -> Plan:
    """2 stages: the fewest Mamba layers (and compile time) that still have a skip."""
    return small_plan(strides=((1, 1, 1), (1, 2, 2)), kernel_sizes=((1, 3, 3), (3, 3, 3)),
                      n_blocks_encoder=(1, 2), n_blocks_decoder=(1,))


def _rng(key) -> np.random.Generator:
    """A NumPy generator seeded from the test's key (host-side inputs cost no compilation)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _call(module, *args):
    return nnx.jit(lambda m, *a: m(*a))(module, *args)


# ------------------------------------------------------------------------------- blocks
def test_transposed_conv_is_pytorch_conv_transpose(key):
    """ConvTranspose3d(kernel = stride): out[.., i·s + p, o] = Σ_c x[.., i, c] W[c, o, p] + b."""
    rng = _rng(key)
    stride, cin, cout = (1, 2, 3), 5, 4
    layer = nnx.eval_shape(lambda: TransposedConv(cin, cout, stride, rngs=nnx.Rngs(0)))
    w = rng.standard_normal((cin, cout, *stride), np.float32)  # PyTorch layout
    b = rng.standard_normal((cout,), np.float32)
    layer.kernel.set_value(jnp.asarray(w.transpose(2, 3, 4, 0, 1)))
    layer.bias.set_value(jnp.asarray(b))
    x = rng.standard_normal((2, 3, 4, 2, cin), np.float32)
    expected = np.zeros((2, 3, 8, 6, cout))
    for p in np.ndindex(*stride):
        expected[:, p[0]::1, p[1]::2, p[2]::3] = np.einsum("bdhwc,co->bdhwo", x, w[:, :, *p]) + b
    np.testing.assert_allclose(_call(layer, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [((1, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2)),
                                           ((3, 3, 3), (2, 2, 2))])
def test_conv_padding_keeps_size_up_to_stride(kernel, stride):
    conv = nnx.eval_shape(lambda: conv3d(2, 3, kernel, stride, bias=True, dtype=None,
                                         rngs=nnx.Rngs(0)))
    y = jax.eval_shape(lambda c, x: c(x), conv, jax.ShapeDtypeStruct((1, 4, 8, 8, 2), jnp.float32))
    assert y.shape == (1, 4 // stride[0], 8 // stride[1], 8 // stride[2], 3)


def test_instance_norm_matches_numpy(key):
    x = _rng(key).standard_normal((2, 3, 4, 5, 6)).astype(np.float32) * 3 + 1
    norm = InstanceNorm(6)
    norm.scale.set_value(jnp.arange(1.0, 7.0))
    norm.bias.set_value(-jnp.arange(6.0))
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean((1, 2, 3), keepdims=True), xn.var((1, 2, 3), keepdims=True)
    expected = (xn - mean) / np.sqrt(var + 1e-5) * np.arange(1, 7) - np.arange(6)
    np.testing.assert_allclose(_call(norm, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_basic_block_d_skip_is_resnet_d(key):
    def block(cin, cout, stride):
        return nnx.eval_shape(lambda: BasicBlockD(cin, cout, (3, 3, 3), stride, rngs=nnx.Rngs(0)))

    both = block(2, 4, (1, 2, 2))
    assert [type(m) for m in both.skip] == [AvgPool, ConvNormAct]
    assert both.skip[1].act is False and both.skip[1].conv.bias is None
    assert [type(m) for m in block(4, 4, (2, 2, 2)).skip] == [AvgPool]
    assert [type(m) for m in block(2, 4, (1, 1, 1)).skip] == [ConvNormAct]
    assert block(4, 4, (1, 1, 1)).skip is None
    rng = _rng(key)
    x = rng.standard_normal((1, 2, 4, 6, 3)).astype(np.float32)
    expected = sum(x[:, :, p::2, q::3] for p in range(2) for q in range(3)) / 6
    np.testing.assert_allclose(_call(AvgPool((1, 2, 3)), jnp.asarray(x)), expected, rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------------- init
def test_initialisation_is_the_references():
    """He normal (a=1e-2) with PyTorch fan-ins, zero biases, last norm of each block zeroed."""
    model = build_model("segmamba", small_plan(max_num_features=32, base_num_features=32,
                                               strides=((1, 1, 1), (2, 2, 2), (2, 2, 2))))
    conv = model.encoder.stages[1].blocks[0].conv2.conv  # 32 -> 32, 3x3x3: 27,648 samples
    assert float(jnp.std(conv.kernel[...])) == pytest.approx(HE_GAIN / math.sqrt(32 * 27), rel=0.03)
    up = model.decoder.transpconvs[0]  # 32 -> 32, stride 2: PyTorch fan-in is cout · 8
    assert float(jnp.std(up.kernel[...])) == pytest.approx(HE_GAIN / math.sqrt(32 * 8), rel=0.05)
    for path, value in nnx.to_flat_state(nnx.state(model.encoder.stages, nnx.Param)):
        if path[-2:] == ("norm", "scale"):
            assert bool(jnp.all(value[...] == (0.0 if "conv2" in path else 1.0))), path
        if path[-1] == "bias":
            assert bool(jnp.all(value[...] == 0.0)), path
    assert bool(jnp.all(model.decoder.seg_layers[0].bias[...] == 0))
    ln = model.encoder.mamba_layers[0].norm
    assert bool(jnp.all(ln.scale[...] == 1)) and ln.epsilon == 1e-5


@pytest.mark.parametrize("dna_class,variant", [("PlainConvUNet", "plainconvunet"),
                                               ("ResidualEncoderUNet", "resencunet")])
def test_initialisation_is_dynamic_network_architectures(dna_class, variant):
    """Parameter by parameter against DNA's own network initialised as nnU-Net does
    (`network.apply(network.initialize)`: InitWeights_He(1e-2), and for ResEnc
    init_last_bn_before_add_to_0): vectors exactly, weight tensors by their std (≤ 12 %)."""
    torch = pytest.importorskip("torch")
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    from jaxmamba.interop.torch import export_state_dict

    plan = small_plan(base_num_features=32, max_num_features=64, n_blocks_encoder=(2, 2, 2),
                      n_blocks_decoder=(2, 2))
    torch.manual_seed(0)
    net = getattr(dna, dna_class)(
        2, plan.num_stages, plan.features_per_stage, torch.nn.Conv3d, plan.kernel_sizes,
        plan.strides, plan.n_blocks_encoder, plan.num_classes, plan.n_blocks_decoder,
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU)
    net.apply(net.initialize)
    ref = {k: v.numpy() for k, v in net.state_dict().items()}
    got = export_state_dict(build_model(variant, plan))
    assert sorted(got) == sorted(ref)
    for name, r in ref.items():
        assert got[name].shape == r.shape, name
        if r.ndim == 1:
            assert np.array_equal(got[name], r), name
        elif r.size >= 2000:
            assert float(np.std(got[name])) == pytest.approx(float(np.std(r)), rel=0.12), name
            assert abs(float(np.mean(got[name]))) < 0.1 * float(np.std(r)), name


# ------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"plainconvunet"}))  # not in the ref.
def test_parameter_counts_equal_the_reference(reference_dir, dataset, variant):
    counts = json.loads((reference_dir / "torch_models" / "param_counts.json").read_text())
    plan = Plan.load(reference_dir / "plans" / f"{DATASETS[dataset]}.nnUNetPlans.json")
    model = nnx.eval_shape(lambda: build_model(variant, plan))
    assert count_parameters(model) == counts[f"{dataset}/{VARIANTS[variant].reference_name}"]


def test_plan_maps_to_the_architecture(reference_dir):
    plan = Plan.load(reference_dir / "plans" / "Dataset001_BrainTumour.nnUNetPlans.json")
    model = nnx.eval_shape(lambda: build_model("multisegmamba", plan))
    assert model.encoder.stem.convs[0].conv.kernel.shape == (3, 3, 3, 4, 32)  # 4 MRI channels
    assert model.decoder.seg_layers[-1].kernel.shape == (1, 1, 1, 32, 4)  # full res, 4 labels
    assert model.decoder.seg_layers[0].kernel.shape == (1, 1, 1, 320, 4)
    assert len(model.encoder.stages) == 6 and len(model.decoder.stages) == 5
    assert [len(s.blocks) for s in model.encoder.stages] == [2] * 6
    # d_state = min(C, 64) for MultiSegMamba, min(C, 256) for the others.
    assert model.encoder.mamba_layers[5].mambas[0].fwd_mamba.mamba.A_log.shape == (640, 64)
    seg = nnx.eval_shape(lambda: build_model("segmamba", plan))
    assert seg.encoder.mamba_layers[5].mamba.mamba.A_log.shape == (640, 256)


@pytest.mark.parametrize("edit,key", [
    (lambda p: p["configurations"].pop("3d_fullres"), "3d_fullres"),
    (lambda p: p["configurations"]["3d_fullres"]["conv_kernel_sizes"].pop(), "conv_kernel_sizes"),
    (lambda p: p["configurations"]["3d_fullres"].update(patch_size=[48, 192, 200]), "patch_size"),
])
def test_bad_plans_name_the_key(reference_dir, tmp_path, edit, key):
    src = reference_dir / "plans" / "Dataset090_SynapseAbdomen"
    plans = json.loads(src.with_suffix(".nnUNetPlans.json").read_text())
    edit(plans)
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(src.with_suffix(".dataset.json").read_text())
    with pytest.raises(PlanError, match=key):
        build_model("segmamba", Plan.load(tmp_path / "nnUNetPlans.json"))


def test_unknown_variant_and_precision_are_named():
    with pytest.raises(ValueError, match="variant='unet'.*segmamba"):
        build_model("unet", small_plan())
    with pytest.raises(ValueError, match="precision='fp16'.*bf16"):
        build_model("segmamba", small_plan(), precision="fp16")


# ------------------------------------------------------------------------------- forward
def _random_params(model, key):
    """Every parameter drawn at random (so zero-initialised norms do not hide a path)."""
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [0.5 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)
              for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


# segmamba and multisegmamba run forward in tests/test_interop.py against the PyTorch fixtures;
# bisegmamba is segmambaskip's network with the other wiring (test_mamba_wiring_of_the_encoder).
@pytest.mark.parametrize("variant", ["resencunet", "segmambaskip"])
def test_every_variant_runs_forward(key, variant):
    plan = mini_plan()
    model = _random_params(nnx.eval_shape(lambda: build_model(
        variant, plan, mamba=MambaOptions("reference"))), key)
    x = jnp.asarray(_rng(key).standard_normal((2, *plan.patch_size, 2), np.float32))
    (out,) = _call(model, x)
    assert out.shape == (2, 4, 8, 8, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


def test_deep_supervision_outputs_full_resolution_first(key):
    plan = small_plan()
    model = _random_params(nnx.eval_shape(lambda: build_model("resencunet", plan)), key)
    single = nnx.eval_shape(lambda: build_model("resencunet", plan, deep_supervision=False))
    nnx.update(single, nnx.state(model, nnx.Param))
    x = jnp.asarray(_rng(key).standard_normal((2, *plan.patch_size, 2), np.float32))
    outs, (full,) = nnx.jit(lambda m, s, x: (m(x), s(x)))(model, single, x)
    assert [o.shape for o in outs] == [(2, 4, 8, 8, 3), (2, 4, 4, 4, 3)]
    np.testing.assert_allclose(full, outs[0], rtol=1e-6, atol=1e-6)
    single.set_deep_supervision(True)
    assert single.deep_supervision and len(jax.eval_shape(lambda m, x: m(x), single, x)) == 2


class _Flip(nnx.Module):
    """A stand-in Mamba module (no scan to compile): flips the volume, so its use is visible."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, x):
        return jnp.flip(x, axis=(1, 2, 3))


@pytest.mark.parametrize("skip_only", [False, True])
def test_mamba_wiring_of_the_encoder(key, skip_only):
    """SegMambaSkip feeds the conv output to the next stage; the others the Mamba output."""
    plan = small_plan()
    enc = _random_params(nnx.eval_shape(lambda: ResidualEncoder(
        2, (4, 8, 8), plan.kernel_sizes, plan.strides, plan.n_blocks_encoder, mamba=_Flip,
        mamba_on_skips_only=skip_only, rngs=nnx.Rngs(0))), key)
    x = jnp.asarray(_rng(key).standard_normal((1, *plan.patch_size, 2), np.float32))

    def by_hand(enc, x, skip_only):
        x, skips = enc.stem(x), []
        for stage, mamba in zip(enc.stages, enc.mamba_layers, strict=True):
            x = stage(x)
            skips.append(mamba(x))
            x = x if skip_only else skips[-1]
        return skips

    got, expected, other = nnx.jit(lambda e, x: (e(x), by_hand(e, x, skip_only),
                                                 by_hand(e, x, not skip_only)))(enc, x)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[-1], other[-1], atol=1e-3)  # the two wirings differ
    assert [v for v, spec in VARIANTS.items() if spec.mamba_on_skips_only] == ["segmambaskip"]


def test_bf16_precision_switch(key):
    """bf16 convolutions/norms: parameters stay float32, outputs float32 and close to float32's."""
    plan = mini_plan()
    f32 = _random_params(nnx.eval_shape(lambda: build_model(
        "segmamba", plan, mamba=MambaOptions("reference"))), key)
    bf16 = nnx.eval_shape(lambda: build_model("segmamba", plan, precision="bf16",
                                              mamba=MambaOptions("reference")))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    assert bf16.encoder.stages[0].blocks[0].conv1.conv.dtype == jnp.bfloat16
    assert bf16.decoder.transpconvs[0].dtype == jnp.bfloat16
    assert {v.dtype for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param))} == {
        np.dtype(np.float32)}
    x = jnp.asarray(_rng(key).standard_normal((1, *plan.patch_size, 2), np.float32))
    (a,), (b,) = nnx.jit(lambda m1, m2, x: (m1(x), m2(x)))(f32, bf16, x)
    assert b.dtype == jnp.float32
    # bf16 convolutions and norms through 2 stages: measured 7.0e-3 to 1.8e-2 (5 seeds, 2026-12-02)
    assert rel_err(b, a) < 4e-2


def test_memory_preflight_compiles_forward_and_backward():
    plan = small_plan(strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=((1, 3, 3), (3, 3, 3)),
                      n_blocks_encoder=(1, 1), n_blocks_decoder=(1,))
    model = nnx.eval_shape(lambda: build_model("resencunet", plan))
    est = memory_preflight(model, plan, batch_size=2)
    stats = est.stats
    params = 4 * count_parameters(model)
    batch = 2 * 4 * 8 * 8 * (2 * 4 + 4)  # float32 image of 2 channels + int32 labels
    assert stats.argument_size_in_bytes == params + batch
    assert stats.output_size_in_bytes >= params  # the gradients
    assert est.total > stats.argument_size_in_bytes + stats.output_size_in_bytes
