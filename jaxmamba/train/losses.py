"""nnU-Net's training loss (`nnUNetTrainer._build_loss`): CE + soft Dice, deep supervision.

Shapes are channels-last: logits `(B, *S, K)` (K classes, background first), integer targets
`(B, *S)`. The Dice term is nnU-Net's `MemoryEfficientSoftDiceLoss` (softmax, `do_bg=False`,
`smooth=1e-5`, batch dice per plan); the loss is negative by design.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SMOOTH = 1e-5


def deep_supervision_weights(n: int) -> np.ndarray:
    """`[1, 1/2, 1/4, ..., 0] / sum`: nnU-Net's weights, the lowest output weighted 0.

    For 5 outputs: `[1, 1/2, 1/4, 1/8, 0] / 1.875` (`nnUNetTrainer._build_loss`).
    """
    w = np.array([1.0 / 2**i for i in range(n)])
    if n > 1:
        w[-1] = 0.0
    return w / w.sum()


def cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over voxels of `-log softmax(logits)[target]` (torch `CrossEntropyLoss`)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)
    return -jnp.mean(picked)


def soft_dice_loss(logits: jax.Array, target: jax.Array, *, batch_dice: bool) -> jax.Array:
    """nnU-Net `MemoryEfficientSoftDiceLoss(apply_nonlin=softmax, do_bg=False, smooth=1e-5)`.

    `dc = (2·I + smooth) / clip(S_gt + S_pred + smooth, 1e-8)` per (batch, class), foreground
    classes only; with `batch_dice` the sums also run over the batch. Returns `-mean(dc)`.
    """
    k = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]  # (B, *S, K-1)
    onehot = jax.nn.one_hot(target, k, dtype=jnp.float32)[..., 1:]
    spatial = tuple(range(1, logits.ndim - 1))
    axes = (0, *spatial) if batch_dice else spatial
    intersect = jnp.sum(probs * onehot, axis=axes)
    sum_pred = jnp.sum(probs, axis=axes)
    sum_gt = jnp.sum(onehot, axis=axes)
    dc = (2 * intersect + SMOOTH) / jnp.clip(sum_gt + sum_pred + SMOOTH, 1e-8)
    return -jnp.mean(dc)


def dc_ce_loss(logits: jax.Array, target: jax.Array, *, batch_dice: bool) -> jax.Array:
    """nnU-Net `DC_and_CE_loss` with weights 1 and 1."""
    return cross_entropy(logits, target) + soft_dice_loss(logits, target, batch_dice=batch_dice)


def deep_supervision_loss(outputs: Sequence[jax.Array], targets: Sequence[jax.Array], *,
                          batch_dice: bool) -> jax.Array:
    """Weighted sum of `dc_ce_loss` over deep-supervision outputs, full resolution first.

    `outputs[i]` is `(B, *S_i, K)` and `targets[i]` is `(B, *S_i)`; outputs with weight 0 are
    not evaluated (nnU-Net computes and multiplies them by 0, which changes nothing).
    """
    if len(outputs) != len(targets):
        raise ValueError(f"deep supervision: {len(outputs)} network outputs but {len(targets)} "
                         f"targets; the data pipeline and the plan disagree on the scales")
    weights = deep_supervision_weights(len(outputs))
    total = jnp.zeros((), jnp.float32)
    for w, out, tgt in zip(weights, outputs, targets, strict=True):
        if out.shape[:-1] != tgt.shape:
            raise ValueError(f"deep supervision: output {out.shape} does not match target "
                             f"{tgt.shape} (expected target = output without the class axis)")
        if w:
            total = total + float(w) * dc_ce_loss(out, tgt, batch_dice=batch_dice)
    return total


def confusion_counts(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Per foreground class `(tp, fp, fn)` of the argmax prediction, summed over batch and space.

    Returns `(3, K-1)` float32; nnU-Net's online pseudo-Dice is `2tp / (2tp + fp + fn)` of the sums
    over the validation batches of an epoch (`nnUNetTrainer.on_validation_epoch_end`).
    """
    k = logits.shape[-1]
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), k, dtype=jnp.float32)[..., 1:]
    gt = jax.nn.one_hot(target, k, dtype=jnp.float32)[..., 1:]
    axes = tuple(range(logits.ndim - 1))
    tp = jnp.sum(pred * gt, axis=axes)
    fp = jnp.sum(pred * (1 - gt), axis=axes)
    fn = jnp.sum((1 - pred) * gt, axis=axes)
    return jnp.stack([tp, fp, fn])


def pseudo_dice(counts: np.ndarray) -> np.ndarray:
    """`2tp / (2tp + fp + fn)` per class from `(3, K-1)` summed counts; NaN where undefined."""
    tp, fp, fn = np.asarray(counts, np.float64)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
