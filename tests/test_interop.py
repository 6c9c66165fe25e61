"""PyTorch checkpoint interop: parity with the reference fixtures, bit-exact export, mismatch
errors before any computation, safe loading of .npz/.pth, and the convert-torch command."""

import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_test_extra, rel_err, tiny_plan
from flax import nnx

from jaxmamba import cli
from jaxmamba.interop.torch import (
    CheckpointError,
    export_state_dict,
    import_state_dict,
    load_torch,
    read_state_dict,
    write_state_dict,
)
from jaxmamba.layers import MambaOptions
from jaxmamba.models import build_model, count_parameters
from jaxmamba.plans import Plan


def fixtures_plan(**changes) -> Plan:
    """The fixtures' plan (reference/README.md): 4 stages, features 4, 8, 16, 16, 3 classes."""
    plan = tiny_plan(strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                     kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                     n_blocks_encoder=(2, 2, 2, 2), n_blocks_decoder=(2, 2, 2),
                     max_num_features=16)
    return plan.replace(**changes)


def _fixture(reference_dir, name):
    return reference_dir / "torch_models" / f"tiny_{name}.npz"


def _abstract(variant, plan=None):
    return nnx.eval_shape(lambda: build_model(variant, plan or fixtures_plan()))


@pytest.mark.numerics
@pytest.mark.parametrize("name,variant", [("SegMamba", "segmamba"),
                                          ("MultiSegMamba", "multisegmamba")])
def test_export_after_import_is_bit_exact(reference_dir, name, variant):
    ref = read_state_dict(_fixture(reference_dir, name))
    model = _abstract(variant)
    import_state_dict(model, ref)
    sd = export_state_dict(model)
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        assert np.array_equal(sd[k], v), k


@pytest.mark.numerics
@pytest.mark.parametrize("name,variant", [("SegMamba", "segmamba"),
                                          ("MultiSegMamba", "multisegmamba")])
def test_import_reproduces_the_reference_outputs(reference_dir, name, variant):
    """float32, CPU, `xla` scan: all three deep-supervision outputs within 1e-5 (issue 3)."""
    path = _fixture(reference_dir, name)
    model = load_torch(path, variant, fixtures_plan(), mamba=MambaOptions("xla"))
    with np.load(path) as data:
        x = jnp.asarray(data["x"].transpose(0, 2, 3, 4, 1))  # NCDHW -> channels-last
        refs = [data[f"out{i}"].transpose(0, 2, 3, 4, 1) for i in range(3)]
    outs = nnx.jit(lambda m, x: m(x))(model, x)
    assert len(outs) == 3
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= 1e-5


# ------------------------------------------------------------------------------- mismatches
def _assert_untouched(model):
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_wrong_variant_is_refused_with_the_names(reference_dir):
    ref = read_state_dict(_fixture(reference_dir, "SegMamba"))
    model = _abstract("bisegmamba")
    with pytest.raises(CheckpointError) as err:
        import_state_dict(model, ref, source="tiny_SegMamba.npz")
    msg = str(err.value)
    assert "tiny_SegMamba.npz does not match bisegmamba" in msg
    assert "missing encoder.mamba_layers.0.mamba.bwd_mamba.mamba.A_log [8, 4]" in msg
    assert "unexpected encoder.mamba_layers.0.mamba.mamba.A_log [8, 4]" in msg
    assert "looks like variant segmamba" in msg
    _assert_untouched(model)


def test_wrong_plan_is_refused_with_the_shapes(reference_dir):
    ref = read_state_dict(_fixture(reference_dir, "SegMamba"))
    plan = fixtures_plan(labels=(("background", 0), ("a", 1), ("b", 2), ("c", 3)))
    model = _abstract("segmamba", plan)
    with pytest.raises(CheckpointError,
                       match=r"shape of decoder.seg_layers.0.weight: checkpoint \[3, 16, 1, 1, 1\]"
                             r", expected \[4, 16, 1, 1, 1\]"):
        import_state_dict(model, ref)
    _assert_untouched(model)


def test_missing_extra_and_inconsistent_tensors_are_listed(reference_dir):
    ref = read_state_dict(_fixture(reference_dir, "SegMamba"))
    missing = {k: v for k, v in ref.items() if k != "decoder.transpconvs.1.bias"}
    with pytest.raises(CheckpointError, match=r"missing decoder.transpconvs.1.bias \[8\]"):
        import_state_dict(_abstract("segmamba"), missing)
    extra = {**ref, "decoder.extra.weight": np.zeros((2, 3), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected decoder.extra.weight \[2, 3\]"):
        import_state_dict(_abstract("segmamba"), extra)
    name = "encoder.stages.1.blocks.0.conv1.all_modules.0.weight"
    changed = {**ref, name: ref[name] + 1}
    with pytest.raises(CheckpointError, match=f"{name} differs from "
                                              f"encoder.stages.1.blocks.0.conv1.conv.weight"):
        import_state_dict(_abstract("segmamba"), changed)
    copy = "decoder.encoder.stem.convs.0.norm.bias"
    with pytest.raises(CheckpointError, match=f"{copy} differs from encoder.stem.convs.0.norm"):
        import_state_dict(_abstract("segmamba"), {**ref, copy: ref[copy] - 1})


# ------------------------------------------------------------------------------- files
def test_npz_is_never_unpickled(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **{"sd/a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="never unpickled"):
        read_state_dict(path)
    path.write_bytes(pickle.dumps({"sd/a": np.zeros(3)}))  # a pickle under an .npz name
    with pytest.raises(CheckpointError, match="bad.npz: holds Python objects .* never unpickled"):
        read_state_dict(path)
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match="bad.npz: not a readable .npz archive"):
        read_state_dict(path)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(path)
    with pytest.raises(CheckpointError, match="a single array, not an .npz archive"):
        read_state_dict(path)


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(CheckpointError, match=r"pip install 'jaxmamba\[torch\]'"):
        read_state_dict(path)


@pytest.mark.numerics
def test_pth_checkpoints_load_safely(reference_dir, tmp_path):
    torch = import_test_extra("torch")
    ref = read_state_dict(_fixture(reference_dir, "SegMamba"))
    plain = tmp_path / "state_dict.pth"
    write_state_dict(ref, plain)
    got = read_state_dict(plain)
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    # nnU-Net's checkpoint_final.pth keeps numpy objects in its logs: weights_only refuses them.
    nnunet = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {k: torch.from_numpy(v) for k, v in ref.items()},
                "logging": {"ema_fg_dice": [np.float64(0.5)]}, "trainer_name": "x"}, nnunet)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_state_dict(nnunet)
    got = read_state_dict(nnunet, trust=True)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    with pytest.raises(pickle.UnpicklingError):  # what the refusal above protects against
        torch.load(nnunet, weights_only=True)


@pytest.mark.numerics
def test_convert_torch_command_round_trip(reference_dir, tmp_path, capsys):
    plans = tmp_path / "plans" / "nnUNetPlans.json"
    fixtures_plan().save(plans)
    src = _fixture(reference_dir, "SegMamba")
    run_dir, back = tmp_path / "run", tmp_path / "back.npz"
    assert cli.main(["convert-torch", str(src), "--plans", str(plans), "--variant", "segmamba",
                     "-o", str(run_dir)]) == 0
    assert "predict" in capsys.readouterr().out
    assert cli.main(["convert-torch", str(run_dir), "--to-torch", "-o", str(back)]) == 0
    ref, got = read_state_dict(src), read_state_dict(back)
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    # Wrong variant: a clear message and exit status 1, nothing written.
    assert cli.main(["convert-torch", str(src), "--plans", str(plans), "--variant",
                     "multisegmamba", "-o", str(tmp_path / "other")]) == 1
    assert "does not match multisegmamba" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.numerics
@pytest.mark.parametrize("dna_class,variant", [("ResidualEncoderUNet", "resencunet"),
                                               ("PlainConvUNet", "plainconvunet")])
def test_matches_dynamic_network_architectures(key, dna_class, variant):
    """Same import path for DNA's own networks (the version nnunetv2 2.8 uses, >= 0.4.4):
    `ResidualEncoderUNet` (the reference's baseline) and `PlainConvUNet` (nnU-Net's default),
    built with nnU-Net's arguments and perturbed weights, give the same outputs through their own
    state dicts, and export gives those state dicts back bit for bit."""
    torch = import_test_extra("torch")
    dna = import_test_extra("dynamic_network_architectures.architectures.unet")
    plan = fixtures_plan()
    net = getattr(dna, dna_class)(
        1, plan.num_stages, plan.features_per_stage, torch.nn.Conv3d, plan.kernel_sizes,
        plan.strides, plan.n_blocks_encoder, plan.num_classes, plan.n_blocks_decoder,
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True).eval()
    gen = torch.Generator().manual_seed(int(jax.random.randint(key, (), 0, 2**30)))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (p.ndim == 1))
        x = torch.randn(2, 1, *plan.patch_size, generator=gen)
        refs = [r.numpy().transpose(0, 2, 3, 4, 1) for r in net(x)]
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    model = _abstract(variant)
    assert count_parameters(model) == sum(p.numel() for p in net.parameters())
    import_state_dict(model, sd)
    back = export_state_dict(model)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    outs = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)))
    assert len(outs) == len(refs) == plan.num_stages - 1
    for out, ref in zip(outs, refs, strict=True):
        assert rel_err(out, ref) <= 1e-5


def _nnunet_checkpoint(path, sd, plan, configuration="3d_fullres"):
    """What nnU-Net's trainer saves: the weights and the init_args it was built from."""
    torch = import_test_extra("torch")
    plans, dataset = plan.to_nnunet()
    torch.save({"network_weights": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                              "dataset_json": dataset, "device": "cpu"}}, path)
    return path


@pytest.mark.numerics
def test_checkpoint_init_args_must_agree_with_the_plan(reference_dir, tmp_path, capsys):
    """convert-torch refuses an nnU-Net checkpoint trained with other plans (or another
    configuration), naming the file and the key, and writes nothing; agreeing ones convert."""
    plans = tmp_path / "plans" / "nnUNetPlans.json"
    fixtures_plan().save(plans)
    sd = read_state_dict(_fixture(reference_dir, "SegMamba"))
    args = ["--plans", str(plans), "--variant", "segmamba", "--trust-checkpoint", "-o"]
    other = fixtures_plan(spacing=(2.0, 1.0, 1.0), patch_size=(8, 32, 16))
    bad = _nnunet_checkpoint(tmp_path / "other.pth", sd, other)
    assert cli.main(["convert-torch", str(bad), *args, str(tmp_path / "a")]) == 1
    out = capsys.readouterr().err
    assert str(bad) in out and "init_args.plans disagree with" in out and str(plans) in out
    assert "patch_size: plans (8, 16, 16), checkpoint (8, 32, 16)" in out and "spacing" in out
    lowres = _nnunet_checkpoint(tmp_path / "lowres.pth", sd, fixtures_plan(), "3d_lowres")
    assert cli.main(["convert-torch", str(lowres), *args, str(tmp_path / "b")]) == 1
    assert "init_args.configuration is '3d_lowres'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    good = _nnunet_checkpoint(tmp_path / "good.pth", sd, fixtures_plan())
    assert cli.main(["convert-torch", str(good), *args, str(tmp_path / "c")]) == 0


@pytest.mark.numerics
def test_predict_refuses_a_run_whose_plans_file_disagrees(reference_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    model = load_torch(_fixture(reference_dir, "SegMamba"), "segmamba", fixtures_plan())
    from jaxmamba.rundir import save_run
    save_run(run_dir, model, fixtures_plan(), source="test")
    fixtures_plan(kernel_sizes=((3, 3, 3),) * 4).save(run_dir / "nnUNetPlans.json")  # edited
    (tmp_path / "in").mkdir()  # (an output folder inside the input one would be refused first)
    code = cli.main(["predict", "-m", str(run_dir), "-i", str(tmp_path / "in"), "-o",
                     str(tmp_path / "o")])
    out = capsys.readouterr().err
    assert code == 1 and str(run_dir / "nnUNetPlans.json") in out and "conv_kernel_sizes" in out
    assert "checkpoints/best/0/meta" in out and "Traceback" not in out


def _convert(tmp_path, src, capsys):
    plans = tmp_path / "plans" / "nnUNetPlans.json"
    fixtures_plan().save(plans)
    capsys.readouterr()
    rc = cli.main(["convert-torch", str(src), "--plans", str(plans), "--variant", "segmamba",
                   "-o", str(tmp_path / "run")])
    return rc, capsys.readouterr().err


def test_damaged_checkpoint_files_are_one_line(reference_dir, tmp_path, capsys):
    """A truncated .pth or .npz, and a tensor of NaN: `convert-torch` says which and why."""
    ref = read_state_dict(_fixture(reference_dir, "SegMamba"))
    npz = tmp_path / "cut.npz"
    write_state_dict(ref, npz)
    data = npz.read_bytes()
    # cut inside the last member's data: the zip's directory survives, its array does not
    npz.write_bytes(data[: len(data) // 2] + data[-2000:])
    rc, err = _convert(tmp_path, npz, capsys)
    assert rc == 1 and err.count("\n") == 1 and "pickle" not in err.lower(), err
    assert err.startswith(f"error: {npz}:") and ("truncated or damaged" in err
                                                 or "not a readable .npz archive" in err)
    name = "encoder.stem.convs.0.conv.weight"
    nan = tmp_path / "nan.npz"
    write_state_dict({k: np.full_like(v, np.nan) if v.shape == ref[name].shape
                      and np.array_equal(v, ref[name]) else v for k, v in ref.items()}, nan)
    # (the tensor and its aliases, as a diverged training leaves them)
    rc, err = _convert(tmp_path, nan, capsys)
    assert rc == 1 and f"{name} holds {ref[name].size} NaN or inf value(s)" in err, err
    assert "differs from" not in err and not (tmp_path / "run").exists()
    torch = pytest.importorskip("torch")  # the optional extra jaxmamba[torch]
    pth = tmp_path / "cut.pth"
    torch.save({k: torch.from_numpy(v) for k, v in ref.items()}, pth)
    pth.write_bytes(pth.read_bytes()[:4096])
    rc, err = _convert(tmp_path, pth, capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {pth}: not a readable PyTorch file, it is truncated or "
                          f"damaged (")
