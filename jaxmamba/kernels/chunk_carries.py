"""K2 and B2: the scans over chunks (XLA), shared by both kernel backends (README.md beside this
file). A chunk's kernels give its local result from a zero start; these scans carry the true
start across chunks with `lax.associative_scan` over `(B, L/T, D, N)`."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxmamba.scan_math import affine_combine


def chunk_carries(decay, local, init, *, reverse: bool):
    """Scan over chunks of `x ← decay_c ⊙ x + local_c` from `init`, in chunk order (or reversed).

    decay, local: (B, nC, D, N); init: (B, D, N). Returns (the carry entering each chunk
    (B, nC, D, N), the carry after the last chunk (B, D, N)).
    """
    first = -1 if reverse else 0
    local = local.at[:, first].add(decay[:, first] * init)
    _, incl = lax.associative_scan(affine_combine, (decay, local), axis=1, reverse=reverse)
    if reverse:
        return jnp.concatenate([incl[:, 1:], init[:, None]], axis=1), incl[:, 0]
    return jnp.concatenate([init[:, None], incl[:, :-1]], axis=1), incl[:, -1]


def chunk_decay(A, sdt):
    """Product of a chunk's decays, `exp(A Σδ)`: (B, nC, D, N)."""
    return jnp.exp(A.astype(sdt.dtype)[None, None] * sdt[..., None])
