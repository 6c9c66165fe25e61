"""`Plan` reads every nnU-Net 2.x plans layout, writes both, and refuses what it cannot build."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import tiny_plan

from jaxmamba.cli import main
from jaxmamba.datasets.phantom import make_phantom_dataset
from jaxmamba.nnunet_plans import NETWORK_CLASSES
from jaxmamba.plans import Plan, PlanError

SYNAPSE = "plans/Dataset090_SynapseAbdomen"
LEGACY_KEYS = ("UNet_class_name", "UNet_base_num_features", "unet_max_num_features",
               "n_conv_per_stage_encoder", "n_conv_per_stage_decoder", "num_pool_per_axis",
               "pool_op_kernel_sizes", "conv_kernel_sizes")


@pytest.fixture
def synapse(reference_dir):
    """The reference's (pre-2.4 layout) Synapse plans and dataset.json, parsed."""
    return (json.loads((reference_dir / f"{SYNAPSE}.nnUNetPlans.json").read_text()),
            json.loads((reference_dir / f"{SYNAPSE}.dataset.json").read_text()))


def _cfg(plans: dict, name: str = "3d_fullres") -> dict:
    return plans["configurations"][name]


@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet", "SegMamba",
                                     "PanSegMamba", "SegMambaSkip", "MultiSegMamba"])
def test_both_layouts_read_back_the_same_plan(synapse, network):
    legacy = Plan.from_nnunet(*synapse).with_network(network)
    plans, dataset = legacy.to_nnunet()
    arch = _cfg(plans)["architecture"]
    assert arch["network_class_name"] == NETWORK_CLASSES[network]
    key = "n_blocks_per_stage" if network == "ResidualEncoderUNet" else "n_conv_per_stage"
    assert arch["arch_kwargs"][key] == [2] * 6
    assert arch["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    only_new = copy.deepcopy(plans)
    for k in LEGACY_KEYS:
        del _cfg(only_new)[k]
    only_legacy = copy.deepcopy(plans)
    del _cfg(only_legacy)["architecture"]
    for p in (plans, only_new, only_legacy):
        assert Plan.from_nnunet(p, dataset) == legacy.replace(source="<nnUNetPlans>")


def test_inherits_from_resolves_parents_first(synapse):
    plans, dataset = synapse
    _cfg(plans)["inherits_from"] = "base"
    del _cfg(plans)["data_identifier"]
    plans["configurations"]["base"] = {"batch_size": 7, "batch_dice": False, "data_identifier": "x"}
    plans["configurations"]["bs4"] = {"inherits_from": "3d_fullres", "batch_size": 4}
    child = Plan.from_nnunet(plans, dataset, configuration="bs4")
    assert child.batch_size == 4 and child.batch_dice and child.data_identifier == "x"
    assert child.patch_size == (48, 192, 192)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: _cfg(p).update(UNet_class_name="MyUNet"),
     "configurations.3d_fullres.UNet_class_name: unknown network class 'MyUNet'"),
    (lambda p: _cfg(p).update(architecture={"network_class_name": "a.b.Primus",
                                            "arch_kwargs": {}}),
     "configurations.3d_fullres.architecture.network_class_name: unknown network class"),
    (lambda p: p["configurations"].pop("3d_fullres"),
     r"no configurations.3d_fullres \(found: \['2d', '3d_cascade_fullres', '3d_lowres'\]\)"),
    (lambda p: p["configurations"].update(
        {"3d_fullres": {"inherits_from": "a"}, "a": {"inherits_from": "3d_fullres"}}),
     r"configurations.a.inherits_from = '3d_fullres' makes a cycle \(3d_fullres -> a -> "
     r"3d_fullres\)"),
    (lambda p: _cfg(p).update(inherits_from="3d_midres"),
     "configurations.3d_fullres.inherits_from = '3d_midres': no such configuration"),
    (lambda p: _cfg(p).pop("pool_op_kernel_sizes"),
     "missing key configurations.3d_fullres.pool_op_kernel_sizes"),
])
def test_bad_plans_name_the_file_and_key(synapse, reference_dir, edit, message):
    plans, dataset = synapse
    edit(plans)
    with pytest.raises(PlanError, match=f"^plans.json: {message}"):
        Plan.from_nnunet(plans, dataset, source="plans.json")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("dropout_op", "torch.nn.Dropout3d", "dropout_op = 'torch.nn.Dropout3d'"),
    ("norm_op", "torch.nn.BatchNorm3d", "norm_op = 'torch.nn.BatchNorm3d'"),
    ("conv_bias", False, "conv_bias = False"),
    ("features_per_stage", [32, 48, 64, 96, 128, 128], r"features_per_stage = \[32, 48"),
    ("squeeze_excitation", True, "squeeze_excitation = True: .* no such argument"),
])
def test_architectures_jaxmamba_cannot_build_are_refused(synapse, key, value, message):
    plans, dataset = Plan.from_nnunet(*synapse).to_nnunet()
    _cfg(plans)["architecture"]["arch_kwargs"][key] = value
    with pytest.raises(PlanError, match="configurations.3d_fullres.architecture.arch_kwargs."
                                        + message):
        Plan.from_nnunet(plans, dataset)


def test_with_network_refuses_unknown_classes(synapse):
    with pytest.raises(PlanError, match="unknown network class 'UNETR'"):
        Plan.from_nnunet(*synapse).with_network("UNETR")
    assert Plan.from_nnunet(*synapse).with_network("ResEncUNet").network_class == \
        "ResidualEncoderUNet"


def test_plan_and_preprocess_cli_print_one_line_errors(tmp_path, capsys, synapse):
    raw = make_phantom_dataset(tmp_path / "raw", n_cases=2)
    plans, _ = synapse
    plans["configurations"]["3d_fullres"]["UNet_class_name"] = "MyUNet"
    bad = tmp_path / "bad" / "nnUNetPlans.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(plans))
    (bad.parent / "dataset.json").write_text((raw / "dataset.json").read_text())
    assert main(["preprocess", str(raw), "-p", str(bad), "-o", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().err.strip().splitlines()
    assert out == [f"error: {bad}: configurations.3d_fullres.UNet_class_name: unknown "
                   f"network class 'MyUNet'; jaxmamba builds {', '.join(NETWORK_CLASSES)}"]
    assert main(["plan", str(raw), "--planner", "nnUNetPlannerResEncXXL"]) == 1
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: unknown planner 'nnUNetPlannerResEncXXL'")


def test_overrides_are_checked_by_the_plan():
    """`Plan.with_overrides`: fields it may not set, values of the wrong form and values that do
    not fit the plan are refused naming the overrides; a fitting override keeps the source."""
    plan = tiny_plan(source="/cache/nnUNetPlans.json")
    with pytest.raises(PlanError, match=r"^data.plan_overrides.spacing: not overridable"):
        plan.with_overrides({"spacing": [1, 1, 1]})
    with pytest.raises(PlanError, match=r"^data.plan_overrides.patch_size = \[8, 16\]: must be "
                                        r"a list of 3 integers"):
        plan.with_overrides({"patch_size": [8, 16]})
    with pytest.raises(PlanError, match=r"^data.plan_overrides: patch_size \[9, 16, 16\] is not "
                                        r"divisible"):
        plan.with_overrides({"patch_size": [9, 16, 16]})
    changed = plan.with_overrides({"patch_size": [16, 16, 16], "batch_size": 4})
    assert changed.patch_size == (16, 16, 16) and changed.batch_size == 4
    assert changed.source == plan.source
