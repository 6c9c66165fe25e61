"""The train step of the Mamba networks lowered for a CUDA GPU on the CPU (traced and lowered,
never compiled, as tests/test_pallas_selective_scan.py::test_kernels_lower_to_triton does for the
kernels alone, with the Triton backend forced where Mosaic GPU is the default): which scan kernels
one step launches and how often under each `model.remat`, and a bound on the size of
MultiSegMamba's module (its GPU compile took 296 s with remat, 126 s the commit before; issue 26).
A change that adds kernel launches or program text fails here, before a GPU sees it."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_plan
from flax import nnx

import jaxmamba.kernels.selective_scan as ks
from jaxmamba.choices import DEFAULT_REMAT, REMAT
from jaxmamba.config import OptimConfig
from jaxmamba.kernels.backends import ENV
from jaxmamba.kernels.lowered import distinct_kernels, kernel_launches, module_size
from jaxmamba.kernels.triton_backend import unavailable_reason
from jaxmamba.layers import MambaOptions
from jaxmamba.models import build_model
from jaxmamba.train.optim import build_recipe
from jaxmamba.train.step import init_state, make_steps

#: Three stages with the Synapse plan's kinds of stage: its three strides, d_state 24, 48 and 80
#: (padded to 32, 64 and 128: three kernel tilings; MultiSegMamba caps the last at 64),
#: sequences of 1600, 400 and 50 tokens (no multiple of their chunks).
PLAN = tiny_plan(patch_size=(4, 20, 20), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                 kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), n_blocks_encoder=(1, 1, 1),
                 n_blocks_decoder=(1, 1), base_num_features=24, max_num_features=80)
#: Scan directions per stage.
DIRECTIONS = {"segmamba": 1, "multisegmamba": 8}
KERNELS = ("states", "outputs", "adjoints", "gradients")  # K1, K3, B1, B3

#: Lowering tests run on the newest JAX in CI (README "Development").
pytestmark = pytest.mark.newest_jax


def lowered_train_step(variant: str, remat: str) -> str:
    """The text of `jaxmamba.train.step`'s train step (DC+CE, radam_cosine, bf16 convolutions,
    the Pallas scan compiled with the Triton backend), lowered for an H100."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    return _lowered(variant, remat)


@functools.cache  # the module's tests share each lowering
def _lowered(variant: str, remat: str) -> str:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(ks, "resolve_interpret", lambda interpret: False)
        monkeypatch.setenv(ENV, "triton")  # where Mosaic GPU is the default (JAX >= 0.11)
        return _lower(variant, remat)


def _lower(variant: str, remat: str) -> str:
    tx = build_recipe(OptimConfig(recipe="radam_cosine"), epochs=10, iters_per_epoch=10).tx
    model = nnx.eval_shape(lambda: build_model(variant, PLAN, precision="bf16",
                                               mamba=MambaOptions("pallas", remat)))
    graphdef, state = init_state(model, tx)
    image = jax.ShapeDtypeStruct((PLAN.batch_size, *PLAN.patch_size, 1), jnp.float32)
    outputs = nnx.eval_shape(lambda m, x: m(x), model, image)
    batch = {"image": image,
             "target": tuple(jax.ShapeDtypeStruct(o.shape[:-1], jnp.int32) for o in outputs)}
    train_step, _ = make_steps(graphdef, tx, batch_dice=True)
    target = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        "NVIDIA H100", None, "cuda"))
    with jax.sharding.use_abstract_mesh(target):
        lowered = jax.jit(train_step).trace(state, batch).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def expected_launches(variant: str, remat: str) -> dict[str, int]:
    """Per scan: K1, K3, B1 and B3 once; under "states" K3 once more (the backward recomputes
    the scan's output, which "scan" keeps; nothing else of the forward's kernels reruns)."""
    scans = DIRECTIONS[variant] * len(PLAN.strides)
    counts = dict.fromkeys(KERNELS, scans)
    if remat == "states":
        counts["outputs"] = 2 * scans
    return {f"selective_scan_chunk_{k}": n for k, n in counts.items()}


@pytest.mark.parametrize("remat", REMAT)
def test_scan_kernels_per_step(remat):
    text = lowered_train_step("segmamba", remat)
    assert kernel_launches(text) == expected_launches("segmamba", remat)
    assert distinct_kernels(text) == len(KERNELS) * len(PLAN.strides)  # one tiling per stage


#: MultiSegMamba's train step at PLAN, default remat ("states"): its operations (Shardy's
#: annotations apart, `module_size`), measured 51,691 with JAX 0.10.2 and 51,632 with JAX 0.12.0.1
#: (2026-12-07; remat="none" 47,412), +10 %.
MULTI_OPERATIONS = 56_800


def test_multisegmamba_step_size():
    text = lowered_train_step("multisegmamba", DEFAULT_REMAT)
    assert kernel_launches(text) == expected_launches("multisegmamba", DEFAULT_REMAT)
    # each stage's 4 kernels in both directions, once each however often they launch
    assert distinct_kernels(text) == len(KERNELS) * 2 * len(PLAN.strides)
    size = module_size(text)
    assert size.operations <= MULTI_OPERATIONS, size
