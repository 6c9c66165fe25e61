"""What a Mamba layer keeps for the backward pass (`model.remat`), as a `jax.checkpoint` policy.

Without rematerialisation the backward of a Mamba layer keeps every token-sized intermediate of
its forward: the float32 copy of the input, LayerNorm outputs, both in-projection halves, the
causal conv and its SiLU, the x-projection, δ, the gate, the residual sums (15 GiB for one
`MambaLayer` at the first stage of the Synapse plan, batch 2, patch 48×192×192). A layer built
with `remat` other than "none" runs under `jax.checkpoint` (`nnx.remat`, `prevent_cse=True`) with
one of these policies, and the backward recomputes what the policy does not keep from the
layer's input:

* "none": no `jax.checkpoint`; the backward keeps every intermediate.
* "scan": keeps the selective scan's output `y` and its chunk states; recomputes the LayerNorms,
  the in-, x- and dt-projections, the causal conv, softplus, the gate and the residual sums.
* "states" (default, `jaxmamba.choices.DEFAULT_REMAT`): keeps only the scan's chunk states;
  recomputes the above and the scan's
  output (the scan's output kernel runs once more in the backward).

The scan output is the value named `SCAN_OUTPUT` in `jaxmamba.layers.mamba.Mamba`; the chunk
states are the outputs of the Pallas kernel `STATE_KERNEL` (`jaxmamba.kernels.scan_forward`,
`(B, L/T, D, N)` per chunk of T tokens and Σδ per chunk). With the `xla` or `reference` scan there
are no such kernel outputs, so under "scan" and "states" the scan's forward runs again in the
backward. Outputs and gradients are the same under every choice (tests/test_remat.py); only
memory and time differ (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_policies
from jax.extend.core import Literal

#: `checkpoint_name` of the selective scan's output in `Mamba.__call__`.
SCAN_OUTPUT = "mamba_scan_output"
#: Name of the Pallas forward kernel whose outputs are the scan's per-chunk states.
STATE_KERNEL = "selective_scan_chunk_states"


def _chunk_states(prim, *_, **params) -> bool:
    return prim.name == "pallas_call" and params.get("name") == STATE_KERNEL


POLICIES: dict[str, Callable[..., bool]] = {
    "scan": checkpoint_policies.save_from_both_policies(
        checkpoint_policies.save_only_these_names(SCAN_OUTPUT), _chunk_states),
    "states": _chunk_states,
}


def rematerialised(fn: Callable, remat: str) -> Callable:
    """`fn(module, *args)` under `nnx.remat` with the policy of `remat` ("none": `fn` itself)."""
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=POLICIES[remat], prevent_cse=True)


def saved_bytes(f: Callable, *args) -> int:
    """Bytes `jax.vjp(f, *args)` keeps for the backward beyond `f`'s own arguments: the residual
    arrays of the VJP's jaxpr, each counted once. Traced only (`args` may be
    `jax.ShapeDtypeStruct`s): nothing is compiled, allocated or run."""
    jaxpr, (_, vjp_shape) = jax.make_jaxpr(lambda *a: jax.vjp(f, *a), return_shape=True)(*args)
    n_res = len(jax.tree.leaves(vjp_shape))
    outvars = jaxpr.jaxpr.outvars
    args_ = set(jaxpr.jaxpr.invars)
    residuals = {v for v in outvars[len(outvars) - n_res:]
                 if not isinstance(v, Literal) and v not in args_}
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in residuals)
