"""Augmentation (nnU-Net's chain): each transform changes what it should; labels stay aligned."""

import dataclasses

import numpy as np
import pytest
from conftest import assert_close_to

from jaxmamba.data import augment as A


def _blocks(shape, rng):
    """A label map of random boxes (values 1..3) on background, -1 nowhere."""
    seg = np.zeros(shape, np.int16)
    for v in (1, 2, 3):
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        size = [int(rng.integers(s // 4, s // 2)) for s in shape]
        seg[tuple(slice(a, a + b) for a, b in zip(lo, size, strict=True))] = v
    return seg


OFF = {"p_rotation": 0.0, "p_scale": 0.0, "p_noise": 0.0, "p_blur": 0.0, "p_brightness": 0.0,
       "p_contrast": 0.0, "p_lowres": 0.0, "p_gamma_inverted": 0.0, "p_gamma": 0.0,
       "mirror_axes": ()}


def _cfg(patch=(12, 20, 20), **on):
    return A.AugmentConfig(patch_size=patch, **{**OFF, **on})


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_spatial_transform_keeps_image_and_labels_aligned(dummy_2d, rng):
    cfg = _cfg((16, 24, 24), p_rotation=1.0, p_scale=1.0, mirror_axes=(0, 1, 2))
    cfg = dataclasses.replace(cfg, dummy_2d=dummy_2d, rotation_deg=180.0 if dummy_2d else 30.0)
    shape = cfg.initial_patch_size()
    # cubes of 8 voxels with labels 0..3 cycling and a random phase: edges everywhere
    idx = np.indices(shape) + rng.integers(0, 8, (3, 1, 1, 1))
    seg = ((idx[0] // 8 + idx[1] // 8 + 2 * (idx[2] // 8)) % 4).astype(np.int16)
    data = seg[None].astype(np.float32) * 10.0  # the image is the label map, scaled
    out, out_seg = A.augment(data, seg, rng, cfg)
    assert out.shape == (1, *cfg.patch_size) and out_seg.shape == cfg.patch_size
    # away from label edges (interpolation blends neighbours there) the image equals 10 x label
    interior = _interior(out_seg) & (out_seg > 0)
    assert interior.sum() > 50
    assert (np.abs(out[0] / 10.0 - out_seg) < 0.5)[interior].mean() > 0.98
    # a transform applied to the image only would break the agreement
    shifted = np.roll(out_seg, 4, axis=2)
    assert (np.abs(out[0] / 10.0 - shifted) < 0.5)[interior].mean() < 0.8


def _interior(seg):
    """Voxels whose 26 neighbours hold the same label (the border excluded)."""
    same = np.ones(seg.shape, bool)
    for shift in np.ndindex(3, 3, 3):
        same &= np.roll(seg, tuple(s - 1 for s in shift), axis=(0, 1, 2)) == seg
    same[[0, -1]] = same[:, [0, -1]] = same[:, :, [0, -1]] = False
    return same


def test_dummy_2d_rotates_in_plane_only(rng):
    cfg = dataclasses.replace(_cfg(patch=(6, 24, 24), p_rotation=1.0, p_scale=1.0),
                              dummy_2d=True, rotation_deg=180.0)
    shape = cfg.initial_patch_size()
    assert shape[0] == 6
    data = np.broadcast_to(np.arange(1, 7, dtype=np.float32)[:, None, None], shape)[None].copy()
    out, _ = A.spatial(data, np.zeros(shape, np.int16), rng, cfg)
    for k in range(6):  # every S0 slice keeps its own value: nothing mixed across S0
        vals = out[0, k][np.abs(out[0, k]) > 1e-3]
        np.testing.assert_allclose(vals, k + 1, atol=1e-3)


def test_no_spatial_transform_is_a_centre_crop(rng):
    cfg = _cfg()
    shape = cfg.initial_patch_size()
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    seg = _blocks(shape, rng)
    out, out_seg = A.spatial(data, seg, rng, cfg)
    lo = [(s - p) // 2 for s, p in zip(shape, cfg.patch_size, strict=True)]
    box = tuple(slice(a, a + p) for a, p in zip(lo, cfg.patch_size, strict=True))
    np.testing.assert_array_equal(out, data[(slice(None), *box)])
    np.testing.assert_array_equal(out_seg, seg[box])


def test_mirror_flips_image_and_labels_together(rng):
    cfg = _cfg(mirror_axes=(0, 1, 2))
    seg = _blocks((6, 7, 8), rng)
    flipped = 0
    for _ in range(8):
        out, out_seg = A.mirror(seg[None].astype(np.float32), seg, rng, cfg)
        np.testing.assert_array_equal(out[0], out_seg)
        flipped += not np.array_equal(out_seg, seg)
    assert flipped > 0


@pytest.mark.parametrize("name", ["noise", "blur", "brightness", "contrast", "lowres", "gamma",
                                  "gamma_inverted"])
def test_intensity_transforms(name, rng):
    x = (rng.normal(size=(2, 12, 16, 16)) + np.linspace(0, 3, 16)).astype(np.float32)
    p = {"noise": "p_noise", "blur": "p_blur", "brightness": "p_brightness",
         "contrast": "p_contrast", "lowres": "p_lowres", "gamma": "p_gamma",
         "gamma_inverted": "p_gamma_inverted"}[name]
    extra = {"p_blur_channel": 1.0} if name == "blur" else {}
    extra |= {"p_lowres_channel": 1.0, "lowres_zoom": (0.5, 0.6)} if name == "lowres" else {}
    extra |= {"noise_variance": (0.05, 0.1)} if name == "noise" else {}
    cfg = _cfg(**{p: 1.0}, **extra)
    fns = {"noise": A.gaussian_noise, "blur": A.gaussian_blur, "brightness": A.brightness,
           "contrast": A.contrast, "lowres": A.low_resolution,
           "gamma": lambda d, r, c: A.gamma(d, r, c.p_gamma, c, invert=False),
           "gamma_inverted": lambda d, r, c: A.gamma(d, r, c.p_gamma_inverted, c, invert=True)}
    y = fns[name](x.copy(), rng, cfg)
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.allclose(y, x, atol=1e-4)
    if name in ("gamma", "gamma_inverted"):
        assert_close_to(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-3)
        assert_close_to(y.std(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), rtol=1e-3)
    if name == "contrast":
        assert (y.min(axis=(1, 2, 3)) >= x.min(axis=(1, 2, 3)) - 1e-5).all()
        assert (y.max(axis=(1, 2, 3)) <= x.max(axis=(1, 2, 3)) + 1e-5).all()
    if name == "brightness":
        ratio = y / x
        assert_close_to(ratio, ratio[:, :1, :1, :1] * np.ones_like(x), rtol=1e-4)
    if name == "noise":  # batchgenerators: the drawn "variance" is the standard deviation
        assert 0.045 < (y - x).std() < 0.105
    if name == "blur":
        assert (np.diff(y, axis=3).std() < np.diff(x, axis=3).std())
    # with probability 0 nothing changes
    np.testing.assert_array_equal(fns[name](x.copy(), rng, _cfg()), x)


def test_lowres_dummy_2d_keeps_s0_resolution(rng):
    x = rng.normal(size=(1, 5, 16, 16)).astype(np.float32)
    cfg = dataclasses.replace(_cfg(p_lowres=1.0, p_lowres_channel=1.0, lowres_zoom=(0.5, 0.5)),
                              dummy_2d=True)
    y = A.low_resolution(x.copy(), rng, cfg)
    # in-plane 2x nearest down then cubic up; S0 untouched: slices stay independent
    for k in range(5):
        ref = A.low_resolution(x[:, k:k + 1].copy(), np.random.default_rng(0), cfg)
        assert_close_to(y[:, k:k + 1], ref, atol=1e-4)


def test_mask_and_label_cleanup():
    seg = np.array([[[-1, 0, 1, 2]]], np.int16)
    data = np.ones((2, 1, 1, 4), np.float32)
    out, out_seg = A.finalize(data, seg, (True, False))
    np.testing.assert_array_equal(out[0, 0, 0], [0, 1, 1, 1])
    np.testing.assert_array_equal(out[1, 0, 0], [1, 1, 1, 1])
    np.testing.assert_array_equal(out_seg[0, 0], [0, 0, 1, 2])


def test_linear_labels_equal_per_label_interpolation(rng):
    """The corner-gather label resampling equals batchgenerators' rule: each label's indicator
    interpolated linearly, thresholded at 0.5 (inside the volume; ties at 0.5 have measure 0)."""
    from scipy import ndimage
    seg = rng.integers(0, 4, (9, 10, 11)).astype(np.int16)
    seg = ndimage.median_filter(seg, 3)  # regions rather than salt and pepper
    coords = (rng.random((3, 4000)) * (np.array(seg.shape)[:, None] - 1)).astype(np.float32)
    ref = np.zeros(coords.shape[1], np.int16)
    for v in np.unique(seg):
        m = ndimage.map_coordinates((seg == v).astype(np.float32), coords, order=1)
        ref[m >= 0.5] = v
    ours = A.linear_labels(seg, coords)
    assert (ours == ref).mean() > 0.999
    outside = A.linear_labels(seg, np.full((3, 5), -3.0, np.float32))
    np.testing.assert_array_equal(outside, -1)
