"""The one module that touches Pallas' Mosaic GPU API (`jax.pallas.mosaic_gpu` from JAX 0.12.1,
`jax.experimental.pallas.mosaic_gpu` before), like `triton_backend.py` for Triton.

It hides what differs between the JAX versions jaxmamba supports (0.10.2 to 0.12.x): `load`'s
index argument (required in 0.10, deprecated in 0.11, gone in 0.12) and where GPU interpret mode
lives (`InterpretGPUParams`, public from 0.11; 0.10.2's private one cannot interpret
`layout_cast`, so Mosaic kernels run there only compiled, or lowered in tests).

Values in a kernel are warpgroup arrays with explicit layouts (one Pallas thread is a warpgroup of
128 CUDA threads): a `(64, N)` state tile in WGMMA's register layout (`TILE`, N a multiple of 8),
per-channel rows `(64,)` in its row-reduced layout (`ROW`: two channels per thread, replicated
over 4 lanes) and per-state rows `(N,)` in its column-reduced layout (`COL`). Reductions over the
state axis give `ROW` (warp shuffles), over the channel axis `COL` (shuffles and a cross-warp
reduction through shared memory); `broadcast_in_dim` goes back to `TILE`.
"""

from __future__ import annotations

import functools
import inspect

import jax

#: Rows of a state tile: the WGMMA register layout spreads 64 rows over a warpgroup.
TILE_ROWS = 64
#: Let Mosaic use approximate `exp2`/`log`/division (`CompilerParams.approx_math`); read when a
#: kernel is traced (`benchmarks/scan.py --variants approx_math` times it, clearing JAX's caches).
APPROX_MATH = False
#: `CompilerParams.lowering_semantics` by name ("Lane" or "Warpgroup"); None: the JAX version's
#: default (Lane in 0.10, Warpgroup from 0.11). Read when a kernel is traced (benchmarks).
LOWERING_SEMANTICS: str | None = None


@functools.cache
def module():
    """`jax.pallas.mosaic_gpu` (JAX >= 0.12.1) or `jax.experimental.pallas.mosaic_gpu`."""
    try:
        from jax.pallas import mosaic_gpu
    except ImportError:
        from jax.experimental.pallas import mosaic_gpu
    return mosaic_gpu


_NEEDED = ("kernel", "emit_pipeline", "BlockSpec", "Layout", "layout_cast", "load")


def unavailable_reason() -> str | None:
    """None when the Mosaic GPU kernels can compile here, else why not: the API does not import
    or lacks what the kernels use, or the GPU is older than Hopper (sm_90: TMA copies)."""
    try:
        mgpu = module()
    except ImportError as err:
        return f"jax.experimental.pallas.mosaic_gpu does not import ({err})"
    missing = [n for n in _NEEDED if not hasattr(mgpu, n)]
    if missing:
        return f"jax {jax.__version__}'s Pallas Mosaic GPU API lacks {', '.join(missing)}"
    if jax.default_backend() == "gpu":
        capability = getattr(jax.devices()[0], "compute_capability", None)
        try:
            major = int(str(capability).split(".")[0])
        except ValueError:
            return None
        if major < 9:
            return (f"Mosaic GPU kernels need compute capability >= 9.0 (Hopper); this GPU "
                    f"({jax.devices()[0].device_kind}) has {capability}")
    return None


def interpret_unavailable_reason() -> str | None:
    """None when this JAX can run the Mosaic kernels in GPU interpret mode on the CPU."""
    try:
        mgpu = module()
    except ImportError as err:
        return f"jax.experimental.pallas.mosaic_gpu does not import ({err})"
    if not hasattr(mgpu, "InterpretGPUParams"):
        return (f"jax {jax.__version__} has no public Mosaic GPU interpret mode "
                "(InterpretGPUParams, from jax 0.11; 0.10's private one cannot interpret "
                "layout_cast)")
    return None


@functools.cache
def layouts():
    """(TILE, ROW, COL): the state tile's layout and its two reductions (module docstring)."""
    tile = module().Layout.WGMMA
    return tile, tile.reduce(1), tile.reduce(0)


@functools.cache
def _load_takes_index() -> bool:
    param = inspect.signature(module().load).parameters.get("idx")
    return param is not None and param.default is inspect.Parameter.empty


def load(ref, layout, *, vectorized: bool = True):
    """`ref[...]` (index it with `.at[...]` first) as an array in `layout`. `vectorized`: the
    shared-memory transfer free of bank conflicts, which Mosaic fails to find for some layouts
    (a state tile from an untiled buffer); global memory needs `vectorized=False`."""
    mgpu = module()
    if _load_takes_index():
        return mgpu.load(ref, (), layout=layout, optimized=vectorized)
    return mgpu.load(ref, layout=layout, optimized=vectorized)


def store(ref, x):
    """`ref[...] = x` into global memory (index `ref` with `.at[...]` first), element-wise:
    JAX >= 0.12.1 otherwise rejects transfers under 4 bytes a thread (a bf16 row: "GMEM transfer
    width (2 bytes/thread) is smaller than 4 bytes"); earlier versions have no `plgpu.store`."""
    mgpu = module()
    if hasattr(mgpu, "store"):
        mgpu.store(ref, x, optimized=False)
    else:
        ref[...] = x


def layout_cast(x, layout):
    return module().layout_cast(x, layout)


def block_spec(shape, index_map):
    return module().BlockSpec(shape, index_map)


def pipeline(body, *, steps: int, in_specs, carry, depth: int = 2):
    """`emit_pipeline` over `steps` blocks: TMA copies of the next `depth - 1` blocks into shared
    memory run while `body(indices, *smem_refs, carry) -> carry` works on the current one."""
    return module().emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                                  max_concurrent_steps=min(depth, steps), init_carry=carry)


def kernel(body, *, out_shape, grid, grid_names, interpret: bool, name: str):
    """`plgpu.kernel` over `grid` (axes read in the body with `lax.axis_index(name)`), one
    warpgroup per program. Interpret mode runs it on the CPU with every output starting as NaN
    (an element the kernel fails to write stays NaN)."""
    mgpu = module()
    compiler = dict(approx_math=APPROX_MATH)
    if LOWERING_SEMANTICS is not None:
        compiler["lowering_semantics"] = getattr(mgpu.LoweringSemantics, LOWERING_SEMANTICS)
    params = dict(out_type=out_shape, grid=grid, grid_names=grid_names, kernel_name=name,
                  compiler_params=mgpu.CompilerParams(**compiler))
    if interpret:
        if reason := interpret_unavailable_reason():
            raise NotImplementedError(f"selective_scan: Mosaic GPU interpret mode: {reason}")
        params["interpret"] = mgpu.InterpretGPUParams(uninitialized_memory="nan")
    return mgpu.kernel(body, **params)
