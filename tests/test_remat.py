"""`model.remat`: what each Mamba layer kind keeps for the backward, as an exact byte count, and
the same outputs and gradients under every choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to
from flax import nnx
from test_selective_scan import SMALL

from jaxmamba.choices import REMAT
from jaxmamba.kernels import selective_scan as ks
from jaxmamba.kernels.tiling import default_tiling, padded_state
from jaxmamba.layers import MambaLayer, MambaOptions, MultiMambaTrans
from jaxmamba.layers.conv import ConvNormAct
from jaxmamba.layers.remat import saved_bytes

C, N = 8, 4  # channels, d_state; E = 2C inner channels
SHAPE = (2, 4, 6, 10)  # (B, S0, S1, S2): L = 240 tokens, not a multiple of every chunk size
#: kind -> (module, scan directions)
KINDS = {
    "uni": (lambda **kw: MambaLayer(C, bidirectional=False, **kw), 1),
    "bi": (lambda **kw: MambaLayer(C, bidirectional=True, **kw), 2),
    "multi": (lambda **kw: MultiMambaTrans(C, **kw), 8),
}


def functional(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


def layer_saved(kind, remat, scan="pallas", mamba_precision="float32"):
    make, _ = KINDS[kind]
    options = MambaOptions(scan, remat, mamba_precision)
    layer = nnx.eval_shape(lambda: make(d_state=N, options=options, rngs=nnx.Rngs(0)))
    f, params = functional(layer)
    return saved_bytes(f, params, jax.ShapeDtypeStruct((*SHAPE, C), jnp.bfloat16))


def expected_saved(kind, remat, mamba_precision="float32"):
    """Per scan direction, float32: the Pallas forward's chunk states (B, L/T, D_p, N_p) and Σδ
    per chunk (B, L/T, D_p); with "scan" also the scan output (B, L, E), bf16 with a bf16 Mamba
    path. Nothing else: the layer input is an argument, everything token-sized is recomputed."""
    b, length, e = SHAPE[0], int(np.prod(SHAPE[1:])), 2 * C
    tiling = default_tiling(b, length, e, N)
    chunks = -(-length // tiling.chunk)
    tile_d = max(tiling.block_d, tiling.bwd_block_d)
    d_p = -(-e // tile_d) * tile_d
    per_direction = b * chunks * d_p * (padded_state(N) + 1) * 4
    if remat == "scan":
        per_direction += b * length * e * (2 if mamba_precision == "bf16" else 4)
    return KINDS[kind][1] * per_direction


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("remat", ["scan", "states"])
@pytest.mark.parametrize("mamba_precision", ["float32", "bf16"])
def test_saved_bytes_are_the_formula(kind, remat, mamba_precision):
    assert layer_saved(kind, remat, mamba_precision=mamba_precision) == expected_saved(
        kind, remat, mamba_precision)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_without_remat_every_intermediate_is_kept(kind):
    """The switch matters: "none" keeps at least ten (B, L, E) float32 arrays per direction."""
    b, length, e = SHAPE[0], int(np.prod(SHAPE[1:])), 2 * C
    assert layer_saved(kind, "none") > 10 * KINDS[kind][1] * b * length * e * 4


def test_conv_norm_act_keeps_only_the_conv_output():
    """The norm and activation are recomputed: the bf16 conv output (and the bf16 copy of the
    conv kernel) is all that is kept, not 3 float32 copies of the output."""
    block = nnx.eval_shape(lambda: ConvNormAct(4, 8, (3, 3, 3), dtype=jnp.bfloat16,
                                               rngs=nnx.Rngs(0)))
    f, params = functional(block)
    assert saved_bytes(f, params, jax.ShapeDtypeStruct((2, 6, 6, 6, 4), jnp.bfloat16)) == (
        2 * 6**3 * 8 * 2 + 3**3 * 4 * 8 * 2)


@pytest.mark.numerics
def test_outputs_and_gradients_do_not_depend_on_remat(monkeypatch):
    """A bidirectional MambaLayer on the Pallas scan (interpret mode off a GPU, with the small
    tiling of the scan's contract tests: two chunks, saved states), whose chunk states "scan" and
    "states" keep, under `jit` as training runs it: output and every gradient equal under each
    choice. MultiMambaTrans goes through the same `rematerialised` wrapper; what each kind keeps
    is pinned by the traced saved-bytes tests above."""
    monkeypatch.setattr(ks, "default_tiling", lambda *shape: SMALL)
    make, _ = KINDS["bi"]
    x = jax.random.normal(jax.random.key(0), (1, 2, 3, 4, C))
    g = jax.random.normal(jax.random.key(1), x.shape)
    results = []
    for remat in REMAT:
        f, params = functional(make(d_state=N, options=MambaOptions("pallas", remat),
                                    rngs=nnx.Rngs(1)))

        def value_and_vjp(params, x, g, f=f):
            y, vjp = jax.vjp(f, params, x)
            return y, *vjp(g)

        results.append(jax.jit(value_and_vjp)(params, x, g))
    for got in results[1:]:
        assert_close_to(got, results[0], rtol=1e-5, atol=1e-6)


def test_unknown_remat_lists_the_choices():
    with pytest.raises(ValueError, match="remat='all': expected one of 'none', 'scan', 'states'"):
        MambaOptions(remat="all")
    with pytest.raises(ValueError, match="mamba_precision='fp16': expected one of 'float32', "
                                         "'bf16'"):
        MambaOptions(mamba_precision="fp16")


def test_options_are_the_config_model_fields():
    from jaxmamba.config import ModelConfig

    assert MambaOptions.of(ModelConfig()) == MambaOptions()
    assert MambaOptions.of(ModelConfig(scan_implementation="xla", remat="scan",
                                       mamba_precision="bf16")) == MambaOptions(
        scan_implementation="xla", remat="scan", mamba_precision="bf16")
