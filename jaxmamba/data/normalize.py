"""Per-channel intensity normalisation, nnU-Net's schemes (`default_normalization_schemes.py`).

- `CTNormalization`: clip to the dataset's foreground [0.5, 99.5] percentiles, then z-score with
  the dataset's foreground mean and std (from the fingerprint, in the plan).
- `ZScoreNormalization`: per-case z-score; with `use_mask_for_norm`, statistics over the non-zero
  region only and everything outside it set to 0.
- `NoNormalization`: cast only.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization")
_EPS = 1e-8


def scheme_for_channel(name: str) -> str:
    """nnU-Net's channel-name rule: "CT" gets CT normalisation, "noNorm" none, the rest z-score."""
    key = name.strip().lower()
    if key == "ct":
        return "CTNormalization"
    if key in ("nonorm", "none"):
        return "NoNormalization"
    return "ZScoreNormalization"


def normalize_channel(x: np.ndarray, scheme: str, *, mask: np.ndarray | None = None,
                      use_mask: bool = False, ct_properties: dict | None = None) -> np.ndarray:
    """Normalise one channel `(S0, S1, S2)`; `mask` is the non-zero region (bool, same shape)."""
    x = x.astype(np.float32)
    if scheme == "CTNormalization":
        if not ct_properties:
            raise ValueError("CTNormalization needs the plan's foreground_intensity_properties "
                             "(percentile_00_5, percentile_99_5, mean, std)")
        p = ct_properties
        x = np.clip(x, p["percentile_00_5"], p["percentile_99_5"])
        return ((x - p["mean"]) / max(p["std"], _EPS)).astype(np.float32)
    if scheme == "ZScoreNormalization":
        if use_mask and mask is not None:
            out = np.zeros_like(x)
            values = x[mask]
            if values.size:
                out[mask] = (values - values.mean()) / max(float(values.std()), _EPS)
            return out
        return ((x - x.mean()) / max(float(x.std()), _EPS)).astype(np.float32)
    if scheme == "NoNormalization":
        return x
    raise ValueError(f"unknown normalization scheme {scheme!r}; expected one of {SCHEMES}")
