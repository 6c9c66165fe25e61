"""The DC+CE loss and deep supervision against a direct numpy transcription of nnU-Net's code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to

from jaxmamba.train import losses


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nnunet_dc_ce(logits, target, batch_dice):
    """nnU-Net DC_and_CE_loss(MemoryEfficientSoftDiceLoss(do_bg=False, smooth=1e-5), CE), float64,
    written channels-first as nnU-Net does (b, c, x, y, z)."""
    x = np.moveaxis(logits.astype(np.float64), -1, 1)
    k = x.shape[1]
    p = np.moveaxis(_softmax(np.moveaxis(x, 1, -1)), -1, 1)
    y = np.stack([(target == c) for c in range(k)], 1).astype(np.float64)
    p, y = p[:, 1:], y[:, 1:]
    axes = tuple(range(2, x.ndim))
    inter, s_pred, s_gt = (p * y).sum(axes), p.sum(axes), y.sum(axes)
    if batch_dice:
        inter, s_pred, s_gt = inter.sum(0), s_pred.sum(0), s_gt.sum(0)
    dc = (2 * inter + 1e-5) / np.clip(s_gt + s_pred + 1e-5, 1e-8, None)
    logp = np.log(np.moveaxis(_softmax(np.moveaxis(x, 1, -1)), -1, 1))
    ce = -np.mean(np.take_along_axis(logp, target[:, None].astype(int), 1))
    return ce - dc.mean()


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_dc_ce_matches_nnunet(rng, batch_dice, k):
    logits = rng.normal(size=(3, 5, 6, 4, k)).astype(np.float32) * 3
    target = rng.integers(0, k, (3, 5, 6, 4))
    target[0] = 0  # a sample without foreground: nnU-Net's smooth term handles it
    loss = jax.jit(losses.dc_ce_loss, static_argnames="batch_dice")
    got = loss(jnp.asarray(logits), jnp.asarray(target), batch_dice=batch_dice)
    want = _nnunet_dc_ce(logits, target, batch_dice)
    assert_close_to(float(got), want, rtol=1e-5, atol=1e-6)


def test_deep_supervision_weights():
    np.testing.assert_allclose(losses.deep_supervision_weights(5),
                               np.array([1, 1 / 2, 1 / 4, 1 / 8, 0]) / 1.875)
    np.testing.assert_allclose(losses.deep_supervision_weights(1), [1.0])


def test_deep_supervision_loss(rng):
    shapes = [(2, 8, 8, 8), (2, 4, 4, 4), (2, 2, 2, 2)]
    outs = [rng.normal(size=(*s, 3)).astype(np.float32) for s in shapes]
    tgts = [rng.integers(0, 3, s) for s in shapes]
    got = jax.jit(lambda o, t: losses.deep_supervision_loss(o, t, batch_dice=False))(outs, tgts)
    w = np.array([1, 0.5, 0.0]) / 1.5
    want = sum(wi * _nnunet_dc_ce(np.asarray(o), np.asarray(t), False)
               for wi, o, t in zip(w, outs, tgts, strict=True))
    assert_close_to(float(got), want, rtol=1e-5)
    with pytest.raises(ValueError, match="2 network outputs but 3 targets"):
        losses.deep_supervision_loss(outs[:2], tgts, batch_dice=False)
    with pytest.raises(ValueError, match="does not match target"):
        losses.deep_supervision_loss(outs[::-1], tgts, batch_dice=False)


def test_loss_gradient_is_finite_and_lowers_loss(rng):
    logits = jnp.asarray(rng.normal(size=(2, 6, 6, 6, 3)), jnp.float32)
    target = jnp.asarray(rng.integers(0, 3, (2, 6, 6, 6)))
    f = jax.jit(lambda z: losses.dc_ce_loss(z, target, batch_dice=True))
    g = jax.jit(jax.grad(f))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(f(logits - 0.5 * g / jnp.linalg.norm(g))) < float(f(logits))


def test_confusion_counts_and_pseudo_dice():
    # 1-D "volume" of 6 voxels, 3 classes; prediction is the argmax of the logits.
    pred = np.array([[0, 1, 1, 2, 2, 0]])
    gt = np.array([[0, 1, 2, 2, 0, 0]])
    logits = jax.nn.one_hot(pred, 3) * 5.0
    counts = np.asarray(losses.confusion_counts(logits, jnp.asarray(gt)))
    # class 1: tp 1, fp 1, fn 0; class 2: tp 1, fp 1, fn 1
    np.testing.assert_array_equal(counts, [[1, 1], [1, 1], [0, 1]])
    np.testing.assert_allclose(losses.pseudo_dice(counts), [2 / 3, 2 / 4])
    assert np.isnan(losses.pseudo_dice(np.zeros((3, 1))))[0]
