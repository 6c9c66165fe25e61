"""Inference and evaluation (DESIGN §8): sliding-window prediction, metrics, evaluation, previews.

Stable API: `predict_logits` (sliding window + mirroring over any `apply_fn`), the metric functions
of `jaxmamba.infer.metrics`, and `evaluate_folder`.
"""

from jaxmamba.infer.sliding_window import (
    compute_steps,
    data_mesh,
    gaussian_importance_map,
    mirror_combinations,
    pad_to_patch,
    predict_logits,
)

__all__ = [
    "compute_steps",
    "data_mesh",
    "gaussian_importance_map",
    "mirror_combinations",
    "pad_to_patch",
    "predict_logits",
]
