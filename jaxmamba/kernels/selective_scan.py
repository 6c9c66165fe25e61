"""`selective_scan_pallas`: the chunk-parallel Pallas selective scan behind a `jax.custom_vjp`.

Forward: K1 chunk states → K2 scan over chunks (XLA) → K3 outputs; backward: B1 chunk adjoints →
B2 adjoint scan over chunks (XLA) → B3 gradients (README.md beside this file). The VJP saves only
the chunk start states `(B, L/T, D, N)` and `Σδ (B, L/T, D)` besides the inputs; the largest
temporary is B1's saved states `(B, L/(S·stride), D, N)`; no `(B, L, D, N)` tensor exists.
`reverse=True` is an in-kernel row order and a reversed scan over chunks: nothing is flipped.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from jaxmamba.kernels import backends
from jaxmamba.kernels import mosaic_selective_scan as mosaic
from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels.chunk_carries import chunk_carries
from jaxmamba.kernels.chunk_carries import chunk_decay as _chunk_decay
from jaxmamba.kernels.mosaic_common import as_mosaic, default_mosaic_tiling
from jaxmamba.kernels.scan_backward import chunk_adjoints, chunk_gradients
from jaxmamba.kernels.scan_forward import chunk_outputs, chunk_states
from jaxmamba.kernels.tiling import ScanTiling, default_tiling, padded_state
from jaxmamba.scan_math import compute_dtype

_warned_interpret = False
_warned_float64 = False


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret=None`: compiled kernels on a GPU, else interpret mode with a one-time warning."""
    global _warned_interpret
    if interpret is not None:
        return bool(interpret)
    if jax.default_backend() == "gpu":
        return False
    if not _warned_interpret:
        _warned_interpret = True
        warnings.warn(
            f"selective_scan: implementation='pallas' on the {jax.default_backend()!r} backend "
            "runs the Pallas kernels in interpret mode (slow, meant for tests); use "
            "implementation='xla' (or None) for speed on this machine.", stacklevel=3)
    return True


def _forward(st, u, dt, z, A, B, C, D, bias, h0, *, save_states=False):
    """-> (y, final state, chunk start states, Σδ, the backward's saved states or None)."""
    h_loc, sdt = chunk_states(st, u, dt, A, B, bias, h0.dtype)
    h_in, h_last = chunk_carries(_chunk_decay(A, sdt), h_loc, h0, reverse=st.reverse)
    if save_states:
        y, h_fine = chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in, save_states=True)
        return y, h_last, h_in, sdt, h_fine
    return chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in), h_last, h_in, sdt, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st: sc.ScanStatics, u, dt, z, A, B, C, D, bias, h0):
    y, h_last, *_ = _forward(st, u, dt, z, A, B, C, D, bias, h0)
    return y, h_last


def _scan_fwd(st, u, dt, z, A, B, C, D, bias, h0):
    """Saves the inputs, Σδ and the chunk start states, or (`fused_replay`) the backward's
    saved states, whose first per chunk is the chunk's start state."""
    y, h_last, h_in, sdt, h_fine = _forward(st, u, dt, z, A, B, C, D, bias, h0,
                                            save_states=st.fused_replay)
    states = h_fine if st.fused_replay else h_in
    return (y, h_last), (u, dt, z, A, B, C, D, bias, h0, states, sdt)


def _scan_bwd(st, res, cotangents):
    u, dt, z, A, B, C, D, bias, h0, states, sdt = res
    g, g_last = cotangents
    if st.fused_replay:
        h_fine = states
        _, q_loc = chunk_adjoints(st, u, dt, z, g, A, B, C, bias, jax.ShapeDtypeStruct(
            states.shape[:2] + states.shape[3:], states.dtype))
    else:
        h_fine, q_loc = chunk_adjoints(st, u, dt, z, g, A, B, C, bias, states)
    mu, dh0 = chunk_carries(_chunk_decay(A, sdt), q_loc, g_last.astype(q_loc.dtype),
                            reverse=not st.reverse)
    du, ddt, dz, db, dc, da, dd, dbias = chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                                         h_fine, mu)
    return (du, ddt, dz, da.sum((0, 1)).astype(A.dtype), db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), dd.sum((0, 1)).astype(D.dtype),
            dbias.sum((0, 1)).astype(bias.dtype), dh0.astype(h0.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)
#: One executable per phase when called eagerly (interpret mode in tests compiles op by op
#: otherwise); inlined under an outer jit.
_jitted_scan = jax.jit(_scan, static_argnums=0)


def default_backend(interpret: bool) -> str:
    """The backend `backend=None` gets: in interpret mode `triton` (Pallas' generic interpreter,
    any JAX); compiled, the one `backends.compiled_backend` picks for this GPU and JAX (`triton`
    when none compiles: its compile says why)."""
    if interpret:
        return "triton"
    return backends.compiled_backend() or "triton"


def resolve_backend(backend: str | None, interpret: bool, arrays: dict) -> str:
    """`backend`, or `default_backend` for None; float64 `arrays` (name -> array or None) do not
    compile on Mosaic GPU (its layout inference finds no register layout for float64 tiles):
    asked for by name, an error naming the first float64 argument; by default, the Triton
    kernels with a one-time warning (the same error where Triton does not compile here).
    Interpret mode runs float64 on either backend."""
    global _warned_float64
    chosen = backend or default_backend(interpret)
    if chosen not in backends.BACKENDS:
        raise ValueError(f"selective_scan_pallas: unknown backend={chosen!r}; expected one of "
                         f"{backends.BACKENDS} or None")
    wide = [k for k, x in arrays.items() if x is not None and x.dtype == jnp.float64]
    if chosen != "mosaic" or interpret or not wide:
        return chosen
    problem = (f"selective_scan: {wide[0]} has dtype float64, which the compiled Mosaic GPU "
               "kernels do not support (float32, bfloat16 or float16)")
    if backend is None and backends.unavailable_reason("triton") is None:
        if not _warned_float64:
            _warned_float64 = True
            warnings.warn(f"{problem}; running the Triton kernels instead.", stacklevel=3)
        return "triton"
    raise ValueError(f"{problem}; cast the inputs to float32, or use backend='triton' or "
                     "implementation='xla' for float64.")


def _pad(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def selective_scan_pallas(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    *, reverse=False, initial_state=None, tiling: ScanTiling | None = None,
    interpret: bool | None = None, poison_outputs: bool = False, fused_replay: bool = False,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `jaxmamba.ops.scan_reference.selective_scan_reference`.

    `u, delta, z: (B, L, D)`, `B, C: (B, L, N)`, `A: (D, N)`, `D, delta_bias: (D,)`,
    `initial_state: (B, D, N)`. Returns `(y (B, L, D) in u's dtype, final state (B, D, N))` in
    float32 (float64 when an input is float64, interpret mode only).

    Any L, D and N: L is padded to a multiple of the chunk (padding rows are masked to δ = 0),
    D to the channel tile, N to a power of two (zero B, C and A: a state that stays 0).
    `tiling` overrides `default_tiling`; `interpret=None` picks interpret mode off-GPU;
    `poison_outputs` (tests) aliases NaN-filled buffers to every kernel output.
    `fused_replay` (experimental, for A/B timing): under differentiation the forward's output
    kernel saves the backward's states, so the backward replays nothing before its gradient
    kernel; those states, `(B, L/(S·stride), D, N)`, are then kept from the forward to the
    backward instead of living only inside the backward.
    `backend`: "triton" or "mosaic" (Mosaic GPU, `mosaic_selective_scan.py`); None picks
    `default_backend`, and float64 inputs compiled take Triton (`resolve_backend`). The Mosaic
    kernels' tiling is a `MosaicTiling` (64-channel tiles).
    """
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, length, dim = u.shape
    n = A.shape[1]
    interpret = resolve_interpret(interpret)
    backend = resolve_backend(backend, interpret, dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state))
    if backend == "mosaic":
        tiling = as_mosaic(tiling or default_mosaic_tiling(batch, length, dim, n))
    tiling = tiling or default_tiling(batch, length, dim, n)
    lp = -(-length // tiling.chunk) * tiling.chunk
    tile_d = max(tiling.block_d, tiling.bwd_block_d)
    dp = -(-dim // tile_d) * tile_d
    np_ = padded_state(n)
    st = sc.ScanStatics(tiling=tiling, length=length, padded_length=lp,
                        delta_softplus=bool(delta_softplus), reverse=bool(reverse),
                        has_z=z is not None, interpret=interpret,
                        poison_outputs=poison_outputs, fused_replay=bool(fused_replay))

    u_p, dt_p = _pad(_pad(u, 1, lp), 2, dp), _pad(_pad(delta, 1, lp), 2, dp)
    z_p = None if z is None else _pad(_pad(z, 1, lp), 2, dp)
    b_p, c_p = _pad(_pad(B, 1, lp), 2, np_), _pad(_pad(C, 1, lp), 2, np_)
    a_p = _pad(_pad(A, 0, dp), 1, np_)
    d_p = _pad(jnp.zeros((dim,), dtype) if D is None else D, 0, dp)
    bias_p = _pad(jnp.zeros((dim,), dtype) if delta_bias is None else delta_bias, 0, dp)
    h0 = (jnp.zeros((batch, dim, n), dtype) if initial_state is None
          else initial_state.astype(dtype))
    h0_p = _pad(_pad(h0, 1, dp), 2, np_)
    scan = mosaic.scan if backend == "mosaic" else _jitted_scan
    y, h_last = scan(st, u_p, dt_p, z_p, a_p, b_p, c_p, d_p, bias_p, h0_p)
    return y[:, :length, :dim], h_last[:, :dim, :n]
