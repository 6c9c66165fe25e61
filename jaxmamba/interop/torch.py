"""PyTorch / nnU-Net checkpoints ⇄ jaxmamba parameters (README "Networks and PyTorch checkpoints").

- `read_state_dict(path)` / `read_checkpoint(path)`: an nnU-Net/TamingMambas
  `checkpoint_final.pth` (`network_weights`), a plain `state_dict` `.pth`, or an `.npz` with
  `sd/<name>` keys (as the reference fixtures) -> `{name: numpy array}`. `.pth` needs the
  optional extra `jaxmamba[torch]` and is opened with `torch.load(weights_only=True)`; a file
  that needs a full unpickle is refused unless `trust=True`. `.npz` is read with
  `allow_pickle=False`. An nnU-Net checkpoint's `init_args` (its plans) must agree with the plan
  it is converted for (`check_init_args`).
- `import_state_dict(model, sd)`: checks every name, shape and alias before touching the model,
  then sets its parameters (works on an `nnx.eval_shape` model: nothing is initialised).
- `export_state_dict(model)`: the reference's state dict, aliases included, bit for bit.
"""

from __future__ import annotations

import collections
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmamba.atomic import atomic_path
from jaxmamba.errors import UserError, brief
from jaxmamba.interop.mapping import aliases, check_complete, entries, torch_shapes
from jaxmamba.layers.options import DEFAULT_OPTIONS, MambaOptions
from jaxmamba.models import build_model, canonical_variant
from jaxmamba.models.unet import UNet
from jaxmamba.plans import CONFIGURATION, Plan, PlanError
from jaxmamba.rundir import plan_differences

TORCH_SUFFIXES = (".pth", ".pt", ".model")
_MAX_LINES = 12  # per kind of problem


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not match the network; the message says why."""


# ---------------------------------------------------------------------------------- files
def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading or writing PyTorch files needs PyTorch; install the extra with "
            f"`pip install 'jaxmamba[torch]'`, or use an .npz state dict (keys sd/<name>)"
        ) from None
    return torch


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """An `.npz` of plain arrays; a pickle, an object array or a damaged zip is refused."""
    try:  # our own file object: np.load leaves its own open when the zip is damaged
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a plain .npy under an .npz name
                raise CheckpointError(f"{path}: a single array, not an .npz archive of named "
                                      f"arrays (keys sd/<name>)")
            with data:
                keys = [k for k in data.files if k.startswith("sd/")] or list(data.files)
                return {k.removeprefix("sd/"): _member(path, data, k) for k in keys}
    except CheckpointError:
        raise
    except ValueError as err:  # a pickle under an .npz name
        if "pickle" not in str(err):
            raise CheckpointError(f"{path}: not a readable .npz archive ({brief(err)})") from None
        raise CheckpointError(f"{path}: holds Python objects (a pickle or an object array), not "
                              f"only arrays; .npz state dicts are never unpickled (write one with "
                              f"numpy.savez of plain arrays)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable .npz archive ({type(err).__name__}: "
                              f"{err})") from None


def _member(path: Path, data, key: str) -> np.ndarray:
    """One array of an open `.npz`; a pickled member and a damaged one are told apart."""
    try:
        return data[key]
    except ValueError as err:
        if "pickle" in str(err):  # numpy: "Object arrays cannot be loaded when allow_pickle"
            raise CheckpointError(f"{path}: member {key} holds Python objects (an object "
                                  f"array), not numbers; .npz state dicts are never unpickled "
                                  f"(write one with numpy.savez of plain arrays)") from None
        raise CheckpointError(f"{path}: member {key} cannot be read, the archive is truncated "
                              f"or damaged ({brief(err)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: member {key} cannot be read, the archive is truncated "
                              f"or damaged ({brief(err)})") from None


def read_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, np.ndarray]:
    """`{PyTorch name: array}` from a `.pth`/`.pt` checkpoint or state dict, or an `.npz`."""
    return read_checkpoint(path, trust=trust)[0]


def read_checkpoint(path: str | Path, *, trust: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict | None]:
    """`(state dict, init_args)`: the tensors as `read_state_dict`, and the `init_args` (plans,
    configuration, dataset_json) an nnU-Net `checkpoint_final.pth` records, or None."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".npz":
        return _read_npz(path), None  # no init_args in an .npz
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .npz "
                              f"or one of {', '.join(TORCH_SUFFIXES)}")
    torch = _import_torch(path)
    try:
        obj = _torch_load(torch, path, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust:
            raise CheckpointError(
                f"{path}: this file holds Python objects besides tensors (nnU-Net checkpoints keep "
                f"trainer settings and logs), which only a full unpickle can read, and unpickling "
                f"runs code stored in the file. If you trust where the file came from, pass "
                f"--trust-checkpoint (trust=True). Detail: {str(err).splitlines()[0]}") from None
        obj = _torch_load(torch, path, weights_only=False)
    sd, init_args = obj, None
    if isinstance(obj, Mapping):
        sd = obj.get("network_weights", obj.get("state_dict", obj))
        init_args = obj.get("init_args") if isinstance(obj.get("init_args"), Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, or a checkpoint with "
                              f"'network_weights' or 'state_dict'; found {type(obj).__name__}")
    for prefix in ("_orig_mod.", "module."):  # torch.compile / DistributedDataParallel wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return ({k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
             for k, v in sd.items()}, init_args)


def _torch_load(torch, path: Path, *, weights_only: bool):
    """`torch.load`; a truncated or damaged file is a `CheckpointError` in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file, it is truncated or damaged "
                              f"({brief(err)})") from None


def check_init_args(init_args: Mapping, plan: Plan, *, source: str) -> None:
    """Raise `CheckpointError` when an nnU-Net checkpoint's `init_args` (the plans and
    configuration it was trained with) disagree with `plan`, naming the file and the keys."""
    configuration = init_args.get("configuration", CONFIGURATION)
    if configuration != CONFIGURATION:
        raise CheckpointError(f"{source}: init_args.configuration is {configuration!r}; jaxmamba "
                              f"converts {CONFIGURATION} networks only")
    plans, dataset = init_args.get("plans"), init_args.get("dataset_json")
    if not isinstance(plans, Mapping) or not isinstance(dataset, Mapping):
        return  # a checkpoint without its plans: the state-dict check is all there is
    try:
        trained = Plan.from_nnunet(dict(plans), dict(dataset), source=f"{source} init_args.plans")
    except PlanError as err:  # a layout this version cannot read: say so, check the tensors only
        warnings.warn(f"{source}: init_args.plans not compared with {plan.source} ({err})",
                      stacklevel=2)
        return
    differences = plan_differences(plan, trained)
    if differences:
        raise CheckpointError(
            f"{source}: the checkpoint's init_args.plans disagree with {plan.source} ("
            + "; ".join(f"{key}: plans {a}, checkpoint {b}" for key, a, b in differences)
            + "); pass the plans the network was trained with (plans.json of its nnU-Net "
              "model folder)")


def write_state_dict(sd: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write a state dict as `.npz` (keys `sd/<name>`) or `.pth` (needs torch), atomically."""
    path = Path(path)
    if path.suffix not in (".npz", *TORCH_SUFFIXES):
        raise CheckpointError(f"{path}: unknown output type {path.suffix!r}; use .npz or .pth")
    torch = _import_torch(path) if path.suffix in TORCH_SUFFIXES else None
    with atomic_path(path) as tmp:
        if torch is None:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"sd/{k}": v for k, v in sd.items()})
        else:
            torch.save(collections.OrderedDict(
                (k, torch.from_numpy(np.array(v, order="C"))) for k, v in sd.items()), tmp)


# ---------------------------------------------------------------------------------- mapping
def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The reference's state dict of `model`: PyTorch names and layouts, aliases included."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    sd = {e.torch_name: np.ascontiguousarray(e.to_torch(np.asarray(params[e.path][...])))
          for e in entries(model)}
    for alias, target in aliases(model, list(sd)).items():
        sd[alias] = sd[target]
    return sd


def _describe(names) -> str:
    """What a state dict looks like, to help when it does not match."""
    names = list(names)
    if any(".mambas." in n for n in names):
        kind = "multisegmamba"
    elif any(".fwd_mamba." in n for n in names):
        kind = "bisegmamba or segmambaskip (their state dicts are identical)"
    elif any(n.startswith("encoder.mamba_layers.") for n in names):
        kind = "segmamba"
    elif any(n.startswith("encoder.stages.0.0.convs.") for n in names):
        kind = "plainconvunet"
    elif any(n.startswith("decoder.stages.0.convs.") for n in names):
        kind = "resencunet"
    else:
        kind = "not a jaxmamba network"
    stages = {n.split(".")[2] for n in names if n.startswith("encoder.stages.")}
    return f"the checkpoint looks like variant {kind} with {len(stages)} encoder stages"


def check_state_dict(model: nnx.Module, sd: Mapping[str, np.ndarray], *,
                     source: str = "<state dict>") -> None:
    """Raise `CheckpointError` listing every missing, unexpected, mis-shaped or inconsistent
    tensor of `sd` for `model` (aliases must equal their tensor bit for bit)."""
    expected = torch_shapes(model)
    problems = check_complete({k: tuple(np.shape(v)) for k, v in sd.items()}, expected)
    if not any(problems.values()):
        problems["dtype"] = [f"dtype of {k}: {np.asarray(v).dtype}, expected a floating dtype"
                             for k, v in sd.items()
                             if not np.issubdtype(np.asarray(v).dtype, np.floating)]
        problems["non-finite"] = [f"{k} holds {n} NaN or inf value(s) (a diverged training?)"
                                  for k, v in sd.items() if not problems["dtype"]
                                  and (n := int(np.size(v) - np.isfinite(v).sum()))]
        names = [e.torch_name for e in entries(model)]
        problems["alias"] = [f"{alias} differs from {target} (one tensor in the reference)"
                             for alias, target in aliases(model, names).items()
                             if not np.array_equal(sd[alias], sd[target], equal_nan=True)]
    total = sum(len(lines) for lines in problems.values())
    if total:
        shown = []
        for kind, lines in problems.items():
            shown += lines[:_MAX_LINES]
            if len(lines) > _MAX_LINES:
                shown.append(f"... and {len(lines) - _MAX_LINES} more {kind}")
        variant = getattr(model, "variant", type(model).__name__)
        raise CheckpointError(
            f"{source} does not match {variant} for this plan ({total} problems; "
            f"{_describe(sd)}):\n  " + "\n  ".join(shown))


def import_state_dict(model: nnx.Module, sd: Mapping[str, np.ndarray], *,
                      source: str = "<state dict>") -> None:
    """Set `model`'s parameters from a PyTorch-named state dict, after `check_state_dict`."""
    check_state_dict(model, sd, source=source)
    flat = [(e.path, nnx.Param(jnp.asarray(e.from_torch(np.asarray(sd[e.torch_name])),
                                           jnp.float32)))
            for e in entries(model)]
    nnx.update(model, nnx.from_flat_state(flat))


def load_torch(path: str | Path, variant: str, plan: Plan, *, precision: str = "float32",
               mamba: MambaOptions = DEFAULT_OPTIONS, trust: bool = False,
               deep_supervision: bool = True) -> UNet:
    """Build `variant` for `plan` without initialising it and load a PyTorch checkpoint into it
    (after checking an nnU-Net checkpoint's `init_args` against `plan`)."""
    sd, init_args = read_checkpoint(path, trust=trust)
    if init_args is not None:
        check_init_args(init_args, plan, source=str(path))
    model = nnx.eval_shape(lambda: build_model(
        canonical_variant(variant), plan, precision=precision, deep_supervision=deep_supervision,
        mamba=mamba))
    import_state_dict(model, sd, source=str(path))
    return model
