"""The precision policy: one switch for the computation dtype of convolutions and norms.

Parameters are always float32. The Mamba path computes in float32, as the reference's
`autocast(enabled=False)` (TamingMambas `MambaLayer`), whatever this switch says: `jaxmamba.layers`
casts at its own boundary, so nothing here or in the networks casts anywhere else; its Mamba
blocks have their own switch (`MambaOptions.mamba_precision`, `model.mamba_precision`). Norm
statistics are float32 too.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxmamba import choices

_DTYPES = {"float32": jnp.float32, "bf16": jnp.bfloat16}
#: precision name (`jaxmamba.choices.PRECISIONS`) -> computation dtype of convolutions,
#: transposed convolutions and norms.
PRECISIONS = {name: _DTYPES[name] for name in choices.PRECISIONS}


def compute_dtype(precision: str):
    """The convolution/norm computation dtype of a precision name ("float32" or "bf16")."""
    return PRECISIONS[choices.check(precision, choices.PRECISIONS, "precision")]
