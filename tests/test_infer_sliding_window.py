"""Sliding-window prediction: nnU-Net steps, Gaussian, mirroring, padding, sharding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmamba.infer.network import network_apply_fn
from jaxmamba.infer.sliding_window import (
    WindowOptions,
    compute_steps,
    gaussian_importance_map,
    mirror_combinations,
    pad_to_patch,
    predict_logits,
)
from jaxmamba.ops.mesh import make_mesh

NO_MIRRORING = WindowOptions(mirror_axes=None)


@pytest.mark.parametrize("size, patch, expected", [
    (160, 64, [0, 32, 64, 96]),        # ceil(96 / 32) + 1 = 4 windows, stride 32
    (100, 64, [0, 18, 36]),            # ceil(36 / 32) + 1 = 3 windows, stride 18
    (64, 64, [0]),
    (65, 64, [0, 1]),
    (147, 48, [0, 20, 40, 59, 79, 99]),  # stride 99 / 5 = 19.8, rounded
])
def test_compute_steps_matches_nnunet(size, patch, expected):
    assert compute_steps([size], [patch], 0.5) == [expected]


def test_compute_steps_rejects_small_image():
    with pytest.raises(ValueError, match="smaller than the patch"):
        compute_steps([10, 40], [16, 16])


@pytest.mark.parametrize("patch", [(8, 16, 12), (5, 9, 7)])
def test_gaussian_importance_map(patch):
    g = gaussian_importance_map(patch)
    center = tuple(p // 2 for p in patch)
    assert g.shape == patch and g.dtype == np.float32
    assert g[center] == pytest.approx(10.0) and g.max() == pytest.approx(10.0)
    assert g.min() > 0
    # a blurred impulse is a sampled Gaussian with sigma = patch / 8 along each axis
    for axis, p in enumerate(patch):
        sigma = p / 8
        for d in (1, 2):
            if center[axis] - d < 0:
                continue
            idx = list(center)
            idx[axis] -= d
            np.testing.assert_allclose(g[tuple(idx)] / 10.0, np.exp(-d**2 / (2 * sigma**2)),
                                       rtol=1e-3)


def test_mirror_combinations():
    combos = mirror_combinations((0, 1, 2))
    assert len(combos) == 8 and combos[0] == () and len(set(combos)) == 8
    assert mirror_combinations(()) == [()]


def test_pad_to_patch_centres_and_crops_back(key):
    image = np.asarray(jax.random.normal(key, (3, 20, 5, 2)))
    padded, crop = pad_to_patch(image, (8, 16, 5))
    assert padded.shape == (8, 20, 5, 2)
    np.testing.assert_array_equal(padded[crop], image)
    assert crop[0] == slice(2, 5)  # 5 voxels of padding: 2 before, 3 after, as nnU-Net
    assert not padded[:2].any() and not padded[5:].any()


def _identity(num_classes):
    return jax.jit(lambda w: 5.0 * jax.nn.one_hot(w[..., 0].astype(jnp.int32), num_classes))


@pytest.mark.parametrize("shape, patch, accumulate", [
    ((11, 37, 30), (4, 16, 16), "device"),   # larger than the patch, anisotropic patch
    ((11, 37, 30), (4, 16, 16), "host"),
    ((4, 16, 16), (4, 16, 16), "device"),    # equal
    ((3, 10, 21), (4, 16, 16), "device"),    # smaller on two axes, larger on one
    ((6, 40, 9), (6, 8, 12), "host"),        # anisotropic volume
])
def test_identity_network_reproduces_labels(key, shape, patch, accumulate):
    k = 4
    labels = np.asarray(jax.random.randint(key, shape, 0, k))
    logits = predict_logits(_identity(k), labels[..., None].astype(np.float32), patch,
                            num_classes=k, window=WindowOptions(accumulate=accumulate))
    assert logits.shape == (*shape, k) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits.argmax(-1), labels)
    np.testing.assert_allclose(logits.max(-1), 5.0, rtol=1e-5)


def _reference(fn, image, patch, k, axes):
    """nnU-Net's algorithm written out in numpy, one window at a time."""
    padded, crop = pad_to_patch(image, patch)
    acc = np.zeros((*padded.shape[:-1], k))
    weight = np.zeros(padded.shape[:-1])
    g = gaussian_importance_map(patch).astype(np.float64)
    for start in itertools.product(*compute_steps(padded.shape[:-1], patch)):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        w = padded[sl][None]
        preds = [np.flip(fn(np.flip(w, [a + 1 for a in c])), [a + 1 for a in c])
                 for c in mirror_combinations(axes)]
        acc[sl] += np.mean(preds, 0)[0] * g[..., None]
        weight[sl] += g
    return (acc / weight[..., None])[crop]


@pytest.mark.parametrize("axes, batch_size, accumulate, n_devices", [
    ((0, 1, 2), 3, "device", 4),   # partial last batch, sharded over 4 devices
    ((1, 2), None, "host", 4),
    (None, 2, "device", 1),
    ((0, 2), 1, "auto", 2),
])
def test_matches_numpy_reference_with_position_dependent_network(key, axes, batch_size,
                                                                 accumulate, n_devices):
    patch, k, c = (4, 8, 6), 3, 2
    k1, k2, k3 = jax.random.split(key, 3)
    mix = jax.random.normal(k1, (c, k))
    ramp = jax.random.normal(k2, (*patch, k))   # breaks mirror equivariance
    image = np.asarray(jax.random.normal(k3, (7, 13, 5, c)))
    fn = jax.jit(lambda w: jnp.tanh(w @ mix) + ramp[None])
    window = WindowOptions(mirror_axes=axes, batch_size=batch_size, accumulate=accumulate,
                           mesh=make_mesh(n_devices))
    got = predict_logits(fn, image, patch, num_classes=k, window=window)
    want = _reference(lambda w: np.asarray(fn(jnp.asarray(w))), image, patch, k, axes or ())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_output_shape_is_reported():
    with pytest.raises(ValueError, match="num_classes=3"):
        predict_logits(_identity(2), np.zeros((4, 8, 8, 1), np.float32), (4, 8, 8),
                       num_classes=3, window=NO_MIRRORING)


class _TinyUNet(nnx.Module):
    """A per-voxel linear map with a deep-supervision switch, like the U-Nets' interface."""

    def __init__(self, c, k, rngs):
        self.head = nnx.Linear(c, k, rngs=rngs)
        self.deep_supervision = True

    def set_deep_supervision(self, enabled):
        self.deep_supervision = enabled

    def __call__(self, x):
        y = self.head(x)
        return (y, y[:, ::2, ::2, ::2]) if self.deep_supervision else (y,)


def test_network_apply_fn_replicates_and_matches_direct_call(key):
    k1, k2 = jax.random.split(key)
    model = _TinyUNet(2, 3, nnx.Rngs(k1))
    image = np.asarray(jax.random.normal(k2, (6, 9, 10, 2)))
    fn = network_apply_fn(model)   # all 4 devices
    assert not model.deep_supervision
    got = predict_logits(fn, image, (4, 8, 8), num_classes=3,
                         window=WindowOptions(mirror_axes=(0, 2)))
    # a per-voxel linear map is equivariant and window-independent: logits = the map itself
    want = np.asarray(model(jnp.asarray(image)[None])[0][0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_falls_back_to_the_host_when_the_device_runs_out_of_memory(key):
    labels = np.asarray(jax.random.randint(key, (6, 20, 9), 0, 3))
    calls = []

    def flaky(w):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return _identity(3)(w)

    with pytest.warns(UserWarning, match="on the host instead"):
        logits = predict_logits(flaky, labels[..., None].astype(np.float32), (4, 8, 8),
                                num_classes=3, window=NO_MIRRORING)
    np.testing.assert_array_equal(logits.argmax(-1), labels)
    calls.clear()
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        predict_logits(flaky, labels[..., None].astype(np.float32), (4, 8, 8), num_classes=3,
                       window=WindowOptions(mirror_axes=None, accumulate="device"))


def test_window_options_refuse_an_unknown_accumulate():
    with pytest.raises(ValueError, match="accumulate='gpu': expected one of 'auto', 'device', "
                                         "'host'"):
        WindowOptions(accumulate="gpu")
