"""nnU-Net 2.8 itself as the oracle: fingerprints, plans and networks against nnunetv2 (CPU torch).

nnunetv2 runs in a subprocess (its paths come from the `nnUNet_raw` / `nnUNet_preprocessed` /
`nnUNet_results` environment variables at import time) on a few real Hippocampus cases and on
synthetic data made for what Hippocampus does not exercise: anisotropic and varying spacing,
zero borders to crop, a CT channel beside an MRI one, and (fingerprints only) large cases whose
patch must shrink and that need nnU-Net's 3d_lowres rule. The `test` extra installs nnunetv2 and
torch, so these tests run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import hippocampus_raw

from jaxmamba.data.dataset import RawDataset
from jaxmamba.data.fingerprint import MAX_FG_SAMPLES, extract_fingerprint
from jaxmamba.data.planner import PLANNERS, feature_map_size, plan_from_fingerprint
from jaxmamba.datasets.phantom import phantom_case
from jaxmamba.plans import Plan

#: one worker runs them all under `pytest -n`, so nnunetv2 runs once (see `nnunet_runs`)
pytestmark = [pytest.mark.xdist_group("nnunet_oracle"), pytest.mark.nnunet]

N_HIPPO = 12
TIMEOUT_S = 600
#: dataset -> the planners compared on it. nnunetv2 instantiates a torch network for every
#: memory estimate, seconds each for large cases, so not all four everywhere. What each shows:
#: hippocampus, synthetic: the batch capped by dataset coverage (5 % / 100 %); brain: the patch
#: shrunk to the memory target; abdomen: 3d_lowres exists, so batch_dice; cine: the batch grown
#: by each planner's reference value.
PLAN_CASES = {"hippocampus": list(PLANNERS), "synthetic": list(PLANNERS),
              "brain": ["ExperimentPlanner", "nnUNetPlannerResEncM"],
              "abdomen": ["ExperimentPlanner"],
              "cine": list(PLANNERS)}

#: The fingerprints' foreground-sample budget here (nnU-Net's 1e8 costs minutes in nnunetv2; the
#: rule, `budget // n_cases` per case, and the draws are the same at any budget).
SAMPLES = 10**6

#: Runs nnU-Net 2.8's fingerprint extractor (budget argv[1]; not for datasets given with a
#: fingerprint) and its 3d planners: argv[2:] are `dataset:Planner,Planner,...`. Writes nnU-Net's
#: default budget to budget.json.
_NNUNET_PLAN = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
    DatasetFingerprintExtractor)
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
    ExperimentPlanner)
from nnunetv2.experiment_planning.experiment_planners.residual_unets import (
    residual_encoder_unet_planners as resenc)
pre = os.environ["nnUNet_preprocessed"]
os.makedirs(pre, exist_ok=True)
for job in sys.argv[2:]:
    name, planners = job.split(":")
    if not os.path.isfile(os.path.join(pre, name, "dataset_fingerprint.json")):
        extractor = DatasetFingerprintExtractor(name, num_processes=1)
        json.dump({"budget": extractor.num_foreground_voxels_for_intensitystats},
                  open(os.path.join(pre, "budget.json"), "w"))
        extractor.num_foreground_voxels_for_intensitystats = float(sys.argv[1])
        extractor.show_progress_bar = False
        extractor.run()
    for planner in planners.split(","):
        cls = ExperimentPlanner if planner == "ExperimentPlanner" else getattr(resenc, planner)
        cls(name).plan_experiment()
"""


def run_nnunet(code: str, root: Path, *args: str) -> None:
    """Run `code` with nnunetv2's folders under `root`; fail (not skip) without nnunetv2."""
    env = {**os.environ, "nnUNet_raw": str(root / "raw"),
           "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"nnunetv2 did not finish in {TIMEOUT_S} s: {err}")
    if done.returncode:
        hint = ("; install the test extra: pip install -e '.[test]'"
                if "No module named 'nnunetv2'" in done.stderr else "")
        pytest.fail(f"nnunetv2 failed{hint}:\n{done.stderr[-3000:]}")


def nnunet_outputs(raw: Path) -> tuple[dict, dict[str, dict]]:
    """`(dataset_fingerprint.json, {planner: plans})` that nnunetv2 wrote for dataset `raw`."""
    pre = raw.parents[1] / "preprocessed" / raw.name
    plans = {p.name: json.loads((pre / f"{p.plans_name}.json").read_text())
             for p in PLANNERS.values() if (pre / f"{p.plans_name}.json").is_file()}
    return json.loads((pre / "dataset_fingerprint.json").read_text()), plans


# ---------------------------------------------------------------------- datasets
def _synthetic(root: Path) -> Path:
    """CT + MRI channels, zero borders, z spacing 3.5-6 mm (nnU-Net's anisotropy rule), in-plane
    spacing and shapes varying per case, the CT channel integer-valued with negative values."""
    raw = root / "raw" / "Dataset998_Synthetic"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    rng = np.random.default_rng(998)
    z_spacings = [5.0, 6.0, 3.5, 5.0, 4.0, 6.0]
    for i, z in enumerate(z_spacings):
        shape = [int(10 + rng.integers(-2, 3)), int(44 + rng.integers(-4, 5)),
                 int(40 + rng.integers(-4, 5))]
        image, labels = phantom_case(rng, shape, 2)
        body = image[0] != 0
        ct = np.where(body, np.round(image[0] * 3 - 700), 0).astype(np.int16)
        padded = [np.pad(a, ((1, 2), (3, 0), (0, 4))) for a in (ct, image[1], labels)]
        spacing = (z, 0.8 + 0.05 * (i % 3), 0.8 + 0.05 * (i % 3))
        affine = np.diag([*spacing[::-1], 1.0])
        for c, a in enumerate(padded[:2]):
            nib.save(nib.Nifti1Image(a.transpose(2, 1, 0), affine),
                     raw / "imagesTr" / f"syn_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(padded[2].transpose(2, 1, 0), affine),
                 raw / "labelsTr" / f"syn_{i:03d}.nii.gz")
    meta = {"name": "Synthetic", "channel_names": {"0": "CT", "1": "T2"},
            "labels": {"background": 0, "ellipsoid": 1, "box": 2},
            "numTraining": len(z_spacings), "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    return raw


def _fingerprint_only(root: Path, name: str, spacings, shapes, channels, rel: float) -> Path:
    """A raw folder of one tiny case (nnU-Net opens one to pick its reader) and the fingerprint
    of `len(spacings)` large cases, for the planners alone."""
    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    for c in range(len(channels)):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
                 raw / "imagesTr" / f"case_000_{c:04d}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)),
             raw / "labelsTr" / "case_000.nii.gz")
    meta = {"name": name, "channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": {"background": 0, "a": 1, "b": 2, "c": 3}, "numTraining": len(spacings),
            "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    props = {"mean": 100.0, "median": 90.0, "std": 50.0, "min": -50.0, "max": 900.0,
             "percentile_99_5": 500.0, "percentile_00_5": -20.0}
    fp = {"spacings": [list(map(float, s)) for s in spacings],
          "shapes_after_crop": [list(map(int, s)) for s in shapes],
          "foreground_intensity_properties_per_channel": {str(i): props
                                                          for i in range(len(channels))},
          "median_relative_size_after_cropping": rel}
    (root / "preprocessed" / name).mkdir(parents=True)
    (root / "preprocessed" / name / "dataset_fingerprint.json").write_text(json.dumps(fp))
    return raw


def _large_cases(root: Path) -> list[Path]:
    """Brain MRI (1 mm, 4 channels, patch must shrink), abdomen CT (anisotropic, large: 3d_lowres
    and batch_dice) and cine MRI (10 mm slices, few voxels: the anisotropy rule)."""
    rng = np.random.default_rng(7)
    n = 40
    brain = _fingerprint_only(
        root, "Dataset991_Brain", [(1.0, 1.0, 1.0)] * n,
        [(int(rng.integers(130, 150)), int(rng.integers(160, 180)), int(rng.integers(130, 150)))
         for _ in range(n)], ("T1", "T1ce", "T2", "FLAIR"), 0.4)
    ct = _fingerprint_only(
        root, "Dataset992_Abdomen", [(float(rng.choice([1.5, 2.5, 3.0, 5.0])),
                                      *[float(rng.uniform(0.6, 0.9))] * 2) for _ in range(n)],
        [(int(rng.integers(80, 220)), 512, 512) for _ in range(n)], ("CT",), 0.95)
    cine = _fingerprint_only(
        root, "Dataset993_Cine", [(float(rng.choice([5.0, 10.0, 10.0])), 1.5625, 1.5625)
                                  for _ in range(n)],
        [(int(rng.integers(6, 12)), int(rng.integers(200, 260)), int(rng.integers(180, 230)))
         for _ in range(n)], ("cineMRI",), 0.9)
    return [brain, ct, cine]


@pytest.fixture(scope="module")
def nnunet_runs(datasets_dir, tmp_path_factory) -> dict[str, Path]:
    """nnunetv2's fingerprints and plans of every dataset here, in one process: name -> raw."""
    root = tmp_path_factory.mktemp("nnunet")
    raws = [hippocampus_raw(datasets_dir, root / "raw" / "Dataset004_Hippocampus", N_HIPPO),
            _synthetic(root), *_large_cases(root)]
    raws = {r.name.split("_", 1)[1].lower(): r for r in raws}
    run_nnunet(_NNUNET_PLAN, root, str(SAMPLES),
               *(f"{r.name}:{','.join(PLAN_CASES[k])}" for k, r in raws.items()))
    return raws


@pytest.fixture(params=["hippocampus", "synthetic"])
def oracle(request, nnunet_runs):
    """`(raw folder, nnU-Net's fingerprint, {planner: nnU-Net's plans})` of a dataset."""
    raw = nnunet_runs[request.param]
    return (raw, *nnunet_outputs(raw))


# ---------------------------------------------------------------------- fingerprint
@pytest.mark.slow
def test_fingerprint_equals_nnunet(oracle):
    raw, theirs, _ = oracle
    default = json.loads((raw.parents[1] / "preprocessed" / "budget.json").read_text())["budget"]
    assert MAX_FG_SAMPLES == default
    ours = extract_fingerprint(RawDataset.open(raw), progress=False, max_samples=SAMPLES)
    np.testing.assert_allclose(ours["spacings"], theirs["spacings"], rtol=1e-6)
    assert ours["shapes_after_crop"] == theirs["shapes_after_crop"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(
        theirs["median_relative_size_after_cropping"], rel=1e-12)
    for c, props in theirs["foreground_intensity_properties_per_channel"].items():
        mine = ours["foreground_intensity_properties_per_channel"][c]
        # the same draws: order statistics are exact; nnU-Net sums float32 samples
        for key in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
            assert mine[key] == props[key], (c, key)
        for key in ("mean", "std"):
            assert mine[key] == pytest.approx(props[key], rel=1e-5), (c, key)


# ---------------------------------------------------------------------- plans
@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "planner"),
                         [(d, p) for d, planners in PLAN_CASES.items() for p in planners])
def test_plans_equal_nnunet(nnunet_runs, dataset, planner):
    """nnU-Net's plans load, and planning its fingerprint gives the same 3d_fullres plan."""
    raw = nnunet_runs[dataset]
    fingerprint, plans = nnunet_outputs(raw)
    pre = raw.parents[1] / "preprocessed" / raw.name
    theirs = Plan.load(pre / f"{PLANNERS[planner].plans_name}.json", pre / "dataset.json")
    meta = json.loads((raw / "dataset.json").read_text())
    ours = plan_from_fingerprint(fingerprint, meta, name=raw.name, planner=planner)
    assert ours == theirs.replace(source=ours.source)
    arch = plans[planner]["configurations"]["3d_fullres"]["architecture"]
    assert ours.to_nnunet()[0]["configurations"]["3d_fullres"]["architecture"] == arch


# ---------------------------------------------------------------------- networks
def _small_plan(**changes) -> Plan:
    return Plan(dataset_name="Dataset997_Small", patch_size=(20, 40, 48), batch_size=2,
                spacing=(3.0, 1.0, 1.0), normalization_schemes=("CTNormalization",
                                                                 "ZScoreNormalization"),
                use_mask_for_norm=(False, True),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                n_blocks_encoder=(1, 2, 3, 1), n_blocks_decoder=(1, 2, 1),
                channel_names=("CT", "T2"), labels=(("background", 0), ("a", 1), ("b", 2)),
                base_num_features=8, max_num_features=24, **changes)


def _nnunet_network(plan: Plan, deep_supervision: bool | None):
    """The network nnunetv2 builds from `plan` written by jaxmamba (its `PlansManager` and
    `get_network_from_plans`, as its trainer and predictor do)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = plan.to_nnunet()
    cm = PlansManager(json.loads(json.dumps(plans))).get_configuration("3d_fullres")
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import,
                                  len(dataset["channel_names"]), len(dataset["labels"]),
                                  allow_init=False, deep_supervision=deep_supervision)


@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("patch", [(20, 40, 48), (21, 37, 45), (8, 8, 8)])
def test_feature_map_size_equals_dynamic_network_architectures(network, patch):
    plan = _small_plan().with_network(network)
    net = _nnunet_network(plan, None)  # deep supervision off, as nnU-Net's planner builds it
    assert type(net).__name__ == network
    assert feature_map_size(network, patch, plan.strides, plan.features_per_stage,
                            plan.n_blocks_encoder, plan.n_blocks_decoder, plan.num_classes) \
        == int(net.compute_conv_feature_map_size(patch))


def test_jaxmamba_plans_build_the_same_network_in_nnunet():
    """A ResEnc plan written by jaxmamba: nnunetv2 builds dynamic-network-architectures'
    ResidualEncoderUNet with the parameter count of jaxmamba's `resencunet` for it."""
    from flax import nnx

    from jaxmamba.models import build_model, count_parameters

    plan = _small_plan().with_network("ResidualEncoderUNet")
    net = _nnunet_network(plan, True)
    ours = nnx.eval_shape(lambda: build_model("resencunet", plan))
    assert count_parameters(ours) == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("network", ["SegMamba", "PanSegMamba", "SegMambaSkip", "MultiSegMamba"])
def test_mamba_plans_are_read_by_nnunet(network):
    """nnunetv2's `PlansManager` reads a jaxmamba plan for a TamingMambas network; the class
    path is the reference's (`nnunetv2/nets/<Class>.py`), with its constructor's arguments."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, _ = _small_plan().with_network(network).to_nnunet()
    cm = PlansManager(plans).get_configuration("3d_fullres")
    assert cm.network_arch_class_name == f"nnunetv2.nets.{network}.{network}"
    assert cm.network_arch_init_kwargs["n_conv_per_stage"] == [1, 2, 3, 1]
    assert cm.pool_op_kernel_sizes == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_oracle_cases_exercise_what_they_should(nnunet_runs):
    """The datasets above reach the planner rules PLAN_CASES says they do (in nnunetv2)."""
    plans = {k: nnunet_outputs(raw)[1] for k, raw in nnunet_runs.items()}
    full = {k: {p: v["configurations"]["3d_fullres"] for p, v in d.items()}
            for k, d in plans.items()}
    brain = full["brain"]["ExperimentPlanner"]
    assert np.prod(brain["patch_size"]) < np.prod(brain["median_image_size_in_voxels"])
    assert "3d_lowres" in plans["abdomen"]["ExperimentPlanner"]["configurations"]
    assert full["abdomen"]["ExperimentPlanner"]["batch_dice"]
    assert [full["cine"][p]["batch_size"] for p in PLANNERS] == [2, 4, 13, 23]
    assert full["synthetic"]["ExperimentPlanner"]["spacing"][0] < np.median(
        nnunet_outputs(nnunet_runs["synthetic"])[0]["spacings"], 0)[0]  # anisotropy rule


@pytest.mark.slow
def test_nnunet_resenc_plans_build_the_same_network_in_jaxmamba(nnunet_runs):
    """nnU-Net's ResEnc M plans for Hippocampus: jaxmamba's `resencunet` has the parameter
    count of the ResidualEncoderUNet nnunetv2 builds from the same file."""
    from flax import nnx
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from jaxmamba.models import build_model, count_parameters

    pre = nnunet_runs["hippocampus"].parents[1] / "preprocessed" / "Dataset004_Hippocampus"
    path = pre / "nnUNetResEncUNetMPlans.json"
    cm = PlansManager(str(path)).get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3,
                                 deep_supervision=True)
    plan = Plan.load(path)
    assert plan.network_class == type(net).__name__ == "ResidualEncoderUNet"
    ours = nnx.eval_shape(lambda: build_model("resencunet", plan))
    assert count_parameters(ours) == sum(p.numel() for p in net.parameters())
