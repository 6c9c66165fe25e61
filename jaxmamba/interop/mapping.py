"""The rule between jaxmamba parameters and PyTorch state-dict names and layouts.

A parameter at module path `a/b/0/c` with leaf `kernel` is the PyTorch tensor `a.b.0.c.weight`;
the layout change depends only on the module type (`_LAYOUTS`). The reference's state dict also
holds aliases of the same tensors, reproduced on export and checked on import:
- `P.all_modules.0.*` = `P.conv.*` and `P.all_modules.1.*` = `P.norm.*` for every
  ConvDropoutNormReLU `P` (DNA's `all_modules` Sequential);
- `decoder.encoder.*` = `encoder.*` (the decoder keeps a reference to the encoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from flax import nnx

from jaxmamba.layers import DepthwiseConv1d
from jaxmamba.layers.conv import ConvNormAct, InstanceNorm, TransposedConv

Layout = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(axes: tuple[int, ...]) -> Layout:
    return lambda a: np.transpose(a, axes)


#: (module type, leaf) -> (PyTorch leaf, jax -> torch, torch -> jax); layouts return views.
_LAYOUTS: dict[tuple[type, str], tuple[str, Layout, Layout]] = {
    # Conv3d: (k0, k1, k2, I, O) <-> (O, I, k0, k1, k2)
    (nnx.Conv, "kernel"): ("weight", _transpose((4, 3, 0, 1, 2)), _transpose((2, 3, 4, 1, 0))),
    (nnx.Conv, "bias"): ("bias", _same, _same),
    # ConvTranspose3d: (s0, s1, s2, I, O) <-> (I, O, s0, s1, s2)
    (TransposedConv, "kernel"): ("weight", _transpose((3, 4, 0, 1, 2)),
                                 _transpose((2, 3, 4, 0, 1))),
    (TransposedConv, "bias"): ("bias", _same, _same),
    (InstanceNorm, "scale"): ("weight", _same, _same),
    (InstanceNorm, "bias"): ("bias", _same, _same),
    (nnx.LayerNorm, "scale"): ("weight", _same, _same),
    (nnx.LayerNorm, "bias"): ("bias", _same, _same),
    # Linear: (in, out) <-> (out, in)
    (nnx.Linear, "kernel"): ("weight", _transpose((1, 0)), _transpose((1, 0))),
    (nnx.Linear, "bias"): ("bias", _same, _same),
    # mamba_ssm depthwise Conv1d: (W, E) <-> (E, 1, W)
    (DepthwiseConv1d, "kernel"): ("weight", lambda a: a.T[:, None, :], lambda a: a[:, 0, :].T),
    (DepthwiseConv1d, "bias"): ("bias", _same, _same),
}
#: Parameters kept under their own name and layout, whatever module holds them (mamba_ssm's).
_PLAIN = ("A_log", "D")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its jaxmamba path, its PyTorch name and the layout changes."""

    path: tuple  # nnx state path, e.g. ("encoder", "stem", "convs", 0, "conv", "kernel")
    torch_name: str
    shape: tuple[int, ...]  # jaxmamba shape
    to_torch: Layout
    from_torch: Layout


def _params(module: nnx.Module) -> Iterator[tuple[str, nnx.Param]]:
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param):
            yield name, value


def entries(model: nnx.Module) -> list[Entry]:
    """The canonical (alias-free) PyTorch tensors of `model`, one per jaxmamba parameter."""
    out = []
    for path, module in nnx.iter_modules(model):
        prefix = ".".join(str(p) for p in path)
        for leaf, param in _params(module):
            if leaf in _PLAIN:
                torch_leaf, to_t, from_t = leaf, _same, _same
            else:
                rule = next((r for (cls, name), r in _LAYOUTS.items()
                             if name == leaf and type(module) is cls), None)
                if rule is None:
                    raise TypeError(f"no PyTorch layout rule for {type(module).__name__}.{leaf} "
                                    f"at {prefix or '<root>'}; add it to interop.mapping._LAYOUTS")
                torch_leaf, to_t, from_t = rule
            name = f"{prefix}.{torch_leaf}" if prefix else torch_leaf
            out.append(Entry((*path, leaf), name, tuple(param.shape), to_t, from_t))
    return out


def aliases(model: nnx.Module, names: list[str]) -> dict[str, str]:
    """`alias -> canonical name` for the duplicated tensors of the reference's state dict."""
    conv_norm = {".".join(str(p) for p in path)
                 for path, m in nnx.iter_modules(model) if isinstance(m, ConvNormAct)}
    out: dict[str, str] = {}
    for name in names:
        parent, child, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        if parent in conv_norm and child in ("conv", "norm"):
            out[f"{parent}.all_modules.{0 if child == 'conv' else 1}.{leaf}"] = name
    for alias, target in list(out.items()) + [(n, n) for n in names]:
        if alias.startswith("encoder."):
            out["decoder." + alias] = target
    return out


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Every PyTorch name (aliases included) with the shape the reference gives it."""
    shapes = {e.torch_name: e.to_torch(np.broadcast_to(np.float32(0), e.shape)).shape
              for e in entries(model)}
    for alias, target in aliases(model, list(shapes)).items():
        shapes[alias] = shapes[target]
    return shapes


def check_complete(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
                   ) -> dict[str, list[str]]:
    """`{kind: lines}` of the differences between a state dict's and the expected `name -> shape`
    (kinds "missing", "unexpected", "shape"; empty when they agree)."""
    return {
        "missing": [f"missing {n} {list(s)}" for n, s in expected.items() if n not in found],
        "unexpected": [f"unexpected {n} {list(s)}" for n, s in found.items() if n not in expected],
        "shape": [f"shape of {n}: checkpoint {list(found[n])}, expected {list(s)}"
                  for n, s in expected.items() if n in found and tuple(found[n]) != tuple(s)],
    }
