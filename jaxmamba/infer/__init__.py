"""Inference and evaluation (README "Predict and evaluate").

- `jaxmamba.infer.sliding_window`: `predict_logits` (sliding windows, Gaussian weighting, mirror
  test-time augmentation, sharded over devices) for any `apply_fn`.
- `jaxmamba.infer.metrics`: Dice, HD95, NSD per class or region (numpy/scipy).
- `jaxmamba.infer.network`: an NNX U-Net as an `apply_fn` (state replicated over the mesh).
- `jaxmamba.infer.predict`: `jaxmamba predict` (raw NIfTI -> preprocess -> windows -> NIfTI),
  from run directories (training's or `convert-torch`'s) read by `jaxmamba.rundir`.
- `jaxmamba.infer.evaluate`: `jaxmamba evaluate` (folders of NIfTI label maps -> summary).
- `jaxmamba.infer.preview`: preview PNGs.
- `jaxmamba.infer.crossval`: `jaxmamba crossval` (fold runs, read by `runs`, merged and scored;
  nnU-Net's postprocessing decided by `postprocess_decide`, applied by `postprocess`).
- `jaxmamba.infer.report`: `jaxmamba report` (Dice, memory and time per network and dataset;
  `report_format` draws the table, CSV and plot).

Submodules are imported on first use, so evaluation does not import JAX.
"""

import importlib

_EXPORTS = {
    "predict_logits": "sliding_window",
    "compute_steps": "sliding_window",
    "gaussian_importance_map": "sliding_window",
    "evaluate_case": "metrics",
    "evaluate_folder": "evaluate",
    "save_preview": "preview",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxmamba.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxmamba.infer' has no attribute {name!r}")
