"""Config schema: YAML + `base` + overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml
from conftest import tiny_plan

from jaxmamba.config import ConfigError, load_config, save_config
from jaxmamba.train.optim import build_recipe


def _write(path, text):
    path.write_text(text)
    return path


def test_yaml_base_and_overrides(tmp_path):
    _write(tmp_path / "base.yaml", "data:\n  raw_dir: /data/X\n  plan_overrides:\n"
           "    batch_size: 4\noptim:\n  recipe: radam_cosine\n  lr: 1e-3\n")
    cfg_path = _write(tmp_path / "run.yaml", "base: base.yaml\nname: r1\ndata:\n"
                      "  plan_overrides:\n    patch_size: [16, 32, 32]\ntrain:\n  epochs: 3\n")
    cfg = load_config(cfg_path, ["optim.weight_decay=0", "train.resume=true",
                                 "optim.onecycle_beta1=[0.8, 0.9]", "model.precision=bf16"])
    assert cfg.name == "r1" and cfg.data.raw_dir == "/data/X"
    assert cfg.data.plan_overrides == {"batch_size": 4, "patch_size": [16, 32, 32]}
    assert cfg.optim.recipe == "radam_cosine"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads a string
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.onecycle_beta1 == (0.8, 0.9)
    assert cfg.train.epochs == 3 and cfg.train.resume is True
    assert cfg.model.precision == "bf16"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.raw_dir=/x", "optim.lr=0.5", "data.plans=p.json"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.5
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["trian.epochs=1"], "unknown key trian"),
    (["optim.lr=fast"], "optim.lr = 'fast': expected float or null"),
    (["train.epochs=1.5"], "train.epochs = 1.5: expected int"),
    (["train.epochs=true"], "train.epochs = True: expected int"),
    (["model.variant=unet"], "model.variant = 'unet': expected one of 'plainconvunet', "
                              "'resencunet'"),
    (["optim.recipe=adam"], "optim.recipe = 'adam': expected one of"),
    (["model.remat=all"], "model.remat = 'all': expected one of 'none', 'scan', 'states'"),
    (["model.mamba_precision=fp16"], "model.mamba_precision = 'fp16': expected one of "
                                     "'float32', 'bf16'"),
    (["optim.onecycle_beta1=[0.9]"], "optim.onecycle_beta1 = \\[0.9\\]: expected 2 entries"),
    (["train=3"], "train must be a mapping"),
    (["train.epochs=0"], "train.epochs = 0: must be > 0"),
    (["mesh.data=0"], "mesh.data = 0"),
    (["data.raw_dir="], "data.raw_dir is required"),
    (["epochs"], "expected KEY=VALUE"),
    (["optim.lr=.nan"], "optim.lr = nan: must be a finite number"),
    (["optim.lr=.inf"], "optim.lr = inf: must be a finite number"),
    (["optim.onecycle_beta1=[0.9, .nan]"], r"optim.onecycle_beta1\[1\] = nan: must be a finite"),
    (["data.plan_overrides.batch_dice=maybe"], "batch_dice = 'maybe': must be true or false"),
    (["data.plan_overrides.patch_size=[0,16,16]"], "patch_size = \\[0, 16, 16\\]: must be a list"),
    (["data.plan_overrides.patch_size=[-8,16,16]"], "integers >= 1"),
    (["data.plan_overrides.base_num_features=0"], "base_num_features = 0: must be an integer"),
    (["data.plan_overrides.kernel_sizes=[[2,3,3]]"], "kernel_sizes .* odd integers"),
    (["data.plan_overrides.batch_size=2.5"], "batch_size = 2.5: must be an integer in 1..65,536"),
    (["data.plan_overrides.pacth_size=[8,8,8]"], "pacth_size: not overridable"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.raw_dir=/x", *override])


def test_errors_blame_the_command_line_or_the_file(tmp_path):
    """An override's bad value is the command line's fault; a bad value in the file, the file's."""
    cfg = _write(tmp_path / "c.yaml", "data:\n  raw_dir: /x\n  plan_overrides:\n"
                 "    batch_size: 2.5\noptim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"^command line: optim.lr = inf"):
        load_config(cfg, ["optim.lr=.inf"])
    with pytest.raises(ConfigError, match=r"c.yaml: optim.lr = nan"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"c.yaml: data.plan_overrides.batch_size = 2.5"):
        load_config(cfg, ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^command line: data.plan_overrides.batch_size = 0"):
        load_config(cfg, ["optim.lr=1e-3", "data.plan_overrides.batch_size=0"])


def test_plan_overrides_that_do_not_fit_the_plan_name_the_overrides():
    from jaxmamba.train.data import apply_plan_overrides

    plan = tiny_plan(labels=(("background", 0), ("a", 1)), source="/cache/nnUNetPlans.json")
    with pytest.raises(ConfigError, match=r"^data.plan_overrides: patch_size \[9, 16, 16\] is "
                                          r"not divisible.*\(with the plan /cache/nnUNetPlans"):
        apply_plan_overrides(plan, {"patch_size": [9, 16, 16]})
    assert apply_plan_overrides(plan, {"batch_size": 4}).source == plan.source


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = _write(tmp_path / "bad.yaml", "data:\n  raw_dir: /x\n  fold: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = _write(tmp_path / "typo.yaml", "data:\n  raw_dir: /x\n  flod: 1\n")
    with pytest.raises(ConfigError, match="typo.yaml: unknown key data.flod"):
        load_config(typo)
    loop = _write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "base.yaml"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load_and_build_their_recipe(path):
    cfg = load_config(path, ["data.raw_dir=/data/X"])
    recipe = build_recipe(cfg.optim, epochs=cfg.train.epochs,
                          iters_per_epoch=cfg.train.iters_per_epoch)
    assert float(recipe.lr(0)) > 0
    reference = {"segmamba": ("radam_cosine", 1000), "bisegmamba": ("radam_cosine", 300),
                 "segmambaskip": ("radam_cosine", 1000), "multisegmamba": ("radam_onecycle", 300),
                 "resencunet": ("nnunet", 1000)}
    if path.parent.name in ("synapse", "brats", "acdc"):  # reference recipes: configs/README.md
        want = ("nnunet", 1000) if path.stem.endswith("_nnunet") else reference[path.stem]
        assert (cfg.optim.recipe, cfg.train.epochs) == want
        assert cfg.model.variant == path.stem.removesuffix("_nnunet")
        assert cfg.train.iters_per_epoch == 250
    if path.parent.name == "hippocampus":  # nnU-Net's default network with nnU-Net's recipe
        assert cfg.model.variant == path.stem
        assert path.stem != "plainconvunet" or cfg.optim.recipe == "nnunet"


def test_train_command_line(capsys, tmp_path):
    from jaxmamba.cli.train import main
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main([str(tiny), "optim.lr=0.5", f"train.run_dir={tmp_path}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["train"]["run_dir"] == str(tmp_path)
    assert main([str(tiny), "optim.lrr=0.5"]) == 2
    assert "unknown key optim.lrr" in capsys.readouterr().err
    assert main([str(tiny), str(tiny)]) == 2
    assert not any(tmp_path.iterdir())
