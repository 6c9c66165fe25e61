"""nnU-Net 2.8 itself as the oracle: resampling, preprocessing, prediction and evaluation of
jaxmamba against nnunetv2 (and batchgenerators) run in this process on the same inputs.

nnunetv2 runs through its own API with `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results`
pointing at temporary folders: `DefaultPreprocessor.run_case`, `nnUNetPredictor` on a model folder
written the way nnU-Net's trainer writes one, `compute_metrics_on_folder`. Real Hippocampus cases
(`Dataset004_Hippocampus`) and synthetic volumes cover what Hippocampus does not: anisotropic
spacing (separate z), zero borders to crop, CT normalisation and several channels. Needs the test
extra (torch 2.13 CPU, nnunetv2 2.8); tiny networks and a few small cases keep it to about a
minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import default_codegen

from jaxmamba import cli
from jaxmamba.data import preprocess_case
from jaxmamba.data.resample import resample_image, resample_labels, resize_labels, separate_z_axis
from jaxmamba.infer.evaluate import evaluate_folder
from jaxmamba.plans import Plan

HIPPOCAMPUS_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")
DNA_CLASS = {"plainconvunet": "PlainConvUNet", "resencunet": "ResidualEncoderUNet"}
TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
MIRROR_AXES = (0, 2)  # the checkpoint's inference_allowed_mirroring_axes, jaxmamba's --mirror-axes
pytestmark = pytest.mark.nnunet  # torch + nnunetv2: the Python 3.11 toolchain


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """nnunetv2's modules, imported with its three folders set to temporary directories."""
    root = tmp_path_factory.mktemp("nnunet")
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            (root / name).mkdir()
            mp.setenv(name, str(root / name))
        try:
            import torch
            from nnunetv2.evaluation import evaluate_predictions
            from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
            from nnunetv2.inference import predict_from_raw_data
            from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
                DefaultPreprocessor,
            )
            from nnunetv2.preprocessing.resampling import default_resampling
            from nnunetv2.utilities.plans_handling.plans_handler import (
                ConfigurationManager,
                PlansManager,
            )
        except ImportError as err:
            pytest.fail(f"the nnU-Net oracle needs the test extra (torch==2.13.0, nnunetv2): "
                        f"pip install -e '.[test]' ({err})")
        torch.set_num_threads(2)
        yield types.SimpleNamespace(
            root=root, torch=torch, DefaultPreprocessor=DefaultPreprocessor,
            PlansManager=PlansManager, ConfigurationManager=ConfigurationManager,
            NibabelIO=NibabelIO, resampling=default_resampling,
            predict=predict_from_raw_data, evaluate=evaluate_predictions, mp=mp)


def _plan(name, spacing, channels, labels, *, schemes=None, masks=None, fg=None,
          patch=(16, 24, 16)) -> Plan:
    n = len(channels)
    return Plan(dataset_name=name, patch_size=patch, batch_size=2, spacing=spacing,
                normalization_schemes=schemes or ("ZScoreNormalization",) * n,
                use_mask_for_norm=masks or (False,) * n,
                strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 3,
                n_blocks_encoder=(2, 2, 2), n_blocks_decoder=(1, 1), channel_names=channels,
                labels=tuple((f"l{v}" if v else "background", v) for v in range(labels)),
                base_num_features=4, max_num_features=16,
                foreground_intensity_properties=fg or tuple(
                    {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
                    for _ in channels))


def _nnunet_plans(plan: Plan, network_class: str = "PlainConvUNet") -> tuple[dict, dict]:
    """jaxmamba's plan as nnU-Net plans and dataset.json dictionaries, for `network_class`, with
    the network as nnU-Net 2.8's planners describe it (`architecture.network_class_name`)."""
    plans, dataset = plan.with_network(network_class).to_nnunet()
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == (
        f"dynamic_network_architectures.architectures.unet.{network_class}")
    return plans, dataset


def _preprocess_both(nnunet, plan: Plan, images, label):
    plans, dataset = _nnunet_plans(plan)
    pm = nnunet.PlansManager(plans)
    ref = nnunet.DefaultPreprocessor(verbose=False).run_case(
        [str(f) for f in images], str(label), pm, pm.get_configuration("3d_fullres"), dataset)
    return ref, preprocess_case(images, plan, label)


def _assert_same_preprocessing(ref, got):
    (ref_data, ref_seg, ref_props), (data, seg, props) = ref, got
    assert data.shape == ref_data.shape and data.dtype == np.float32
    assert float(np.abs(data - ref_data).max()) <= 1e-4
    assert np.array_equal(seg, ref_seg[0])
    assert [list(b) for b in ref_props["bbox_used_for_cropping"]] == props["bbox"]


# ---------------------------------------------------------------------------- resampling
SPACINGS = [  # (old, new): isotropic, anisotropic old (z separately), anisotropic new, 2 coarse
    ((1.0, 1.0, 1.0), (0.7, 1.3, 1.1)), ((3.5, 0.8, 0.8), (1.0, 1.0, 1.0)),
    ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)), ((5.0, 1.0, 1.0), (2.5, 0.5, 0.5)),
    ((1.0, 4.0, 4.0), (1.0, 1.0, 1.0))]


@pytest.mark.parametrize("old,new", SPACINGS)
@pytest.mark.parametrize("force", [None, True, False])
def test_resampling_equals_nnunet(nnunet, old, new, force):
    """Images (order 3, clipped to the input range) and labels (argmax of order-1 indicators,
    -1 included) bit for bit against `resample_data_or_seg_to_shape`."""
    rng = np.random.default_rng(SPACINGS.index((old, new)))
    shape = (7, 12, 10)
    image = rng.standard_normal((2, *shape)).astype(np.float32) * 100
    seg = rng.integers(-1, 4, (1, *shape)).astype(np.int8)
    target = nnunet.resampling.compute_new_shape(shape, old, new)
    z = separate_z_axis(old, new, force)
    for order_z in (0, 1):
        ref = nnunet.resampling.resample_data_or_seg_to_shape(
            image, target, old, new, is_seg=False, order=3, order_z=order_z,
            force_separate_z=force)
        got = resample_image(image, target, order=3, z_axis=z, order_z=order_z)
        assert got.dtype == np.float32 and np.array_equal(got, ref)
        ref = nnunet.resampling.resample_data_or_seg_to_shape(
            seg, target, old, new, is_seg=True, order=1, order_z=order_z, force_separate_z=force)
        got = resample_labels(seg[0], target, order=1, z_axis=z, order_z=order_z)
        assert got.dtype == np.int8 and np.array_equal(got, ref[0])


def test_label_resize_equals_batchgenerators_with_ties(nnunet):
    """batchgenerators 0.25.5's `resize_segmentation`: even factors put exact ties on every
    boundary, four labels meet at block corners, shrinking and odd factors."""
    from batchgenerators.augmentations.utils import resize_segmentation

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4, (3, 4, 3)).astype(np.float64)
    for shape in [(6, 8, 6), (12, 16, 12), (2, 3, 2), (5, 9, 7)]:
        assert np.array_equal(resize_labels(blocks, shape, 1),
                              resize_segmentation(blocks, shape, 1))
    for _ in range(10):
        seg = rng.integers(0, 5, tuple(rng.integers(2, 8, 3))).astype(np.float64)
        shape = tuple(int(s) for s in rng.integers(2, 14, 3))
        for order in (0, 1):
            assert np.array_equal(resize_labels(seg, shape, order),
                                  resize_segmentation(seg, shape, order))


# ---------------------------------------------------------------------------- preprocessing
def _hippocampus_case(datasets_dir, case):
    root = datasets_dir / "Dataset004_Hippocampus"
    return [root / "imagesTr" / f"{case}_0000.nii.gz"], root / "labelsTr" / f"{case}.nii.gz"


@pytest.mark.parametrize("spacing,mask", [((1.3, 0.8, 1.1), False), ((3.2, 1.0, 0.9), True)])
def test_hippocampus_preprocessing_equals_nnunet(nnunet, datasets_dir, spacing, mask):
    """Real cases with plans that resample (the second separately along z) and a masked
    z-score: images within 1e-4, labels identical, same crop."""
    plan = _plan("Dataset004_Hippocampus", spacing, ("MRI",), 3, masks=(mask,))
    for case in HIPPOCAMPUS_CASES[:2]:
        _assert_same_preprocessing(*_preprocess_both(
            nnunet, plan, *_hippocampus_case(datasets_dir, case)))


def _write(path: Path, array_zyx: np.ndarray, spacing_zyx) -> Path:
    affine = np.diag([*spacing_zyx[::-1], 1.0])
    affine[:3, 3] = (-12.5, 30.0, 7.0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine), path)
    return path


def _synthetic_case(folder: Path, name: str, seed: int, spacing=(4.0, 0.9, 0.9)):
    """Two channels (CT-like, MR-like) with zero borders around an off-centre body, and a
    label map of two blobs (one reaching into the zero border)."""
    rng = np.random.default_rng(seed)
    shape = (11, 30, 26)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = ((z - 5) / 5.5) ** 2 + ((y - 16) / 11) ** 2 + ((x - 12) / 9) ** 2 < 1
    ct = np.where(body, rng.normal(40, 300, shape), 0).astype(np.float32)
    mr = np.where(body, rng.gamma(2.0, 150.0, shape), 0).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[((z - 5) / 3) ** 2 + ((y - 14) / 5) ** 2 + ((x - 11) / 4) ** 2 < 1] = 1
    seg[(np.abs(z - 6) < 2) & (np.abs(y - 25) < 4) & (np.abs(x - 18) < 3)] = 2
    images = [_write(folder / f"{name}_{c:04d}.nii.gz", a, spacing)
              for c, a in enumerate((ct, mr))]
    return images, _write(folder / f"{name}.nii.gz", seg, spacing)


def test_synthetic_preprocessing_equals_nnunet(nnunet, tmp_path):
    """Anisotropic 4 mm slices (separate z), zero borders cropped, CT normalisation with the
    fingerprint's percentiles on channel 0 and a masked z-score on channel 1."""
    fg = ({"mean": 35.0, "std": 280.0, "percentile_00_5": -600.0, "percentile_99_5": 700.0},
          {"mean": 300.0, "std": 200.0, "percentile_00_5": 10.0, "percentile_99_5": 1500.0})
    for target in [(2.5, 0.8, 0.8), (1.5, 1.0, 1.2)]:
        plan = _plan("Dataset990_Synthetic", target, ("CT", "T2"), 3,
                     schemes=("CTNormalization", "ZScoreNormalization"), masks=(False, True),
                     fg=fg)
        for seed in range(2):
            images, label = _synthetic_case(tmp_path, f"case{seed}", seed)
            ref, got = _preprocess_both(nnunet, plan, images, label)
            assert got[0].shape[1:] != (11, 30, 26) and got[2]["bbox"] != [[0, 11], [0, 30],
                                                                            [0, 26]]
            _assert_same_preprocessing(ref, got)


# ---------------------------------------------------------------------------- prediction
class _Float32Buffers:
    """`torch` as nnunetv2's predictor module sees it, with `torch.half` meaning float32: its
    sliding-window sums then accumulate in float32 (its default float16 buffers round at the
    window borders). With `_float32_gaussian` the only change made to nnU-Net here."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float32 if name == "half" else getattr(self._torch, name)


def _float32_gaussian(compute_gaussian, torch):
    """nnU-Net's `compute_gaussian` with float32 weights (its default dtype is float16)."""
    def gaussian(*args, **kwargs):
        return compute_gaussian(*args, **{**kwargs, "dtype": torch.float32})

    gaussian.cache_clear = compute_gaussian.cache_clear
    return gaussian


def _perturbed(model, seed: int):
    """Every parameter moved off its initial value (zero-initialised norms hide no path)."""
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(seed)
    for _, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(param.shape).astype(np.float32)
        param.set_value(param[...] + jnp.asarray(0.3 * noise if param.ndim == 1 else
                                                 0.1 * noise * float(np.std(param[...]) + 0.1)))
    return model


def _nnunet_model_folder(nnunet, plan: Plan, variant: str, state_dict_file: Path) -> Path:
    """A trained-model folder as nnU-Net's trainer writes it, holding jaxmamba's exported
    weights: plans.json, dataset.json, fold_0/checkpoint_final.pth."""
    torch = nnunet.torch
    plans, dataset = _nnunet_plans(plan, DNA_CLASS[variant])
    trained_with, _ = plan.to_nnunet()  # init_args: the plans as jaxmamba writes them
    folder = nnunet.root / "nnUNet_results" / plan.dataset_name / f"{TRAINER_DIR}_{variant}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    torch.save({"network_weights": torch.load(state_dict_file, weights_only=True),
                "trainer_name": "nnUNetTrainer", "current_epoch": 1,
                "init_args": {"plans": trained_with, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": dataset, "device": "cpu"},
                "inference_allowed_mirroring_axes": MIRROR_AXES},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def predictions(nnunet, datasets_dir, tmp_path_factory):
    """Both predictors on a Hippocampus case with a resampling plan, per variant: jaxmamba's
    network exported (`convert-torch --to-torch`) into an nnU-Net model folder, predicted by
    `nnUNetPredictor`, and that nnU-Net checkpoint imported back (`convert-torch`) and predicted
    by `jaxmamba predict`; step 0.5, Gaussian weights, mirroring along `MIRROR_AXES`. The patch
    covers the resampled case but for two overlapping windows along axis 0 (few network passes:
    the window positions and the Gaussian have their own tests)."""
    from jaxmamba.models import build_model
    from jaxmamba.rundir import save_run

    root = tmp_path_factory.mktemp("predictions")
    plan = _plan("Dataset004_Hippocampus", (1.1, 1.0, 0.9), ("MRI",), 3, patch=(24, 56, 40))
    nnunet.mp.setattr(nnunet.predict, "torch", _Float32Buffers(nnunet.torch))
    nnunet.mp.setattr(nnunet.predict, "compute_gaussian",
                      _float32_gaussian(nnunet.predict.compute_gaussian, nnunet.torch))
    out = {}
    with default_codegen():  # XLA's default CPU code: fast code flips argmax ties
        for seed, variant in enumerate(DNA_CLASS):
            images = [_hippocampus_case(datasets_dir, HIPPOCAMPUS_CASES[seed])[0][0]]
            run = save_run(root / variant / "run", _perturbed(build_model(variant, plan, rngs=seed),
                                                              seed), plan, source="test")
            sd = root / variant / "state_dict.pth"
            assert cli.main(["convert-torch", str(run), "--to-torch", "-o", str(sd)]) == 0
            folder = _nnunet_model_folder(nnunet, plan, variant, sd)
            predictor = nnunet.predict.nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                perform_everything_on_device=False, device=nnunet.torch.device("cpu"),
                allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
            ref_dir = root / variant / "nnunet"
            ref_dir.mkdir()
            predictor.predict_from_files_sequential(
                [[str(f)] for f in images],
                [str(ref_dir / f.name.removesuffix("_0000.nii.gz")) for f in images],
                save_probabilities=True, overwrite=True)
            imported = root / variant / "imported"
            assert cli.main(["convert-torch", str(folder / "fold_0" / "checkpoint_final.pth"),
                             "--plans", str(run / "nnUNetPlans.json"), "--variant", variant,
                             "-o", str(imported), "--trust-checkpoint"]) == 0
            got_dir = root / variant / "jaxmamba"
            assert cli.main(["predict", "-m", str(imported), "-i", *map(str, images),
                             "-o", str(got_dir), "--save-probabilities",
                             "--mirror-axes", ",".join(map(str, MIRROR_AXES))]) == 0
            out[variant] = (ref_dir, got_dir, [f.name.removesuffix("_0000.nii.gz") for f in images])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(DNA_CLASS))
def test_predictions_equal_nnunet(predictions, variant):
    """Same weights, same cases: identical label maps, probabilities within 1e-5."""
    ref_dir, got_dir, cases = predictions[variant]
    for case in cases:
        ref = np.asanyarray(nib.load(ref_dir / f"{case}.nii.gz").dataobj)
        got = np.asanyarray(nib.load(got_dir / f"{case}.nii.gz").dataobj)
        assert ref.shape == got.shape and np.array_equal(ref, got), case
        assert len(np.unique(ref)) > 1, case  # the network predicts more than one class
        with np.load(ref_dir / f"{case}.npz") as r, np.load(got_dir / f"{case}.npz") as g:
            assert float(np.abs(r["probabilities"] - g["probabilities"]).max()) <= 1e-5, case


@pytest.mark.slow
def test_evaluation_equals_nnunet(nnunet, predictions, datasets_dir, tmp_path):
    """`evaluate_folder` against `compute_metrics_on_folder` on the predictions above: the same
    Dice per case and class, and the same means."""
    _, pred_dir, cases = predictions["plainconvunet"]
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for case in cases:
        shutil.copy(_hippocampus_case(datasets_dir, case)[1], gt_dir)
    ref = nnunet.evaluate.compute_metrics_on_folder(
        str(gt_dir), str(pred_dir), None, nnunet.NibabelIO(), ".nii.gz", [1, 2], None, 1)
    got = evaluate_folder(pred_dir, gt_dir, pred_dir / "dataset.json")
    names = {1: "l1", 2: "l2"}
    for r, g in zip(ref["metric_per_case"], got["metric_per_case"], strict=True):
        assert Path(r["prediction_file"]).name == Path(g["prediction_file"]).name
        for label, name in names.items():
            assert g["metrics"][name]["Dice"] == pytest.approx(r["metrics"][label]["Dice"],
                                                               rel=1e-12, nan_ok=True)
    for label, name in names.items():
        assert got["mean"][name]["Dice"] == pytest.approx(ref["mean"][label]["Dice"], rel=1e-12)
