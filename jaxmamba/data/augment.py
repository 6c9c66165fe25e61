"""nnU-Net's augmentation chain, in order (`get_training_transforms`, batchgenerators 0.25).

As `nnUNetTrainer.get_training_transforms` of TamingMambas' nnU-Net fork
(`tamingmambas/nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py`).

Arrays are one sample, channels-first: `data (C, S0, S1, S2)` float32 and `seg (S0, S1, S2)`
int (-1 = outside the image or the non-zero mask). Each transform takes a `numpy.random.Generator`
so the chain is deterministic from the pipeline's per-sample seed. "Dummy 2D" (anisotropic
patches, `max(patch) / patch[0] > 3`) rotates and scales in the (S1, S2) plane only (±180°) and
never simulates low resolution along S0.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_DEG = math.pi / 180


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the chain; the defaults are nnU-Net's."""

    patch_size: tuple[int, ...]
    dummy_2d: bool = False
    rotation_deg: float = 30.0  # ±, per axis (3-D); ±180° about S0 when dummy_2d
    p_rotation: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_scale: float = 0.2
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_channel: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    mask_channels: tuple[bool, ...] = ()  # plan.use_mask_for_norm: zero outside the mask after DA

    @classmethod
    def for_plan(cls, plan, **overrides) -> AugmentConfig:
        """nnU-Net's configuration for a plan: dummy 2D iff `max(patch) / patch[0] > 3`."""
        patch = tuple(plan.patch_size)
        dummy = max(patch) / patch[0] > 3
        kw = {"patch_size": patch, "dummy_2d": dummy, "rotation_deg": 180.0 if dummy else 30.0,
              "mask_channels": tuple(plan.use_mask_for_norm)}
        return cls(**{**kw, **overrides})

    def initial_patch_size(self) -> tuple[int, ...]:
        """The enlarged patch to sample before the spatial transform (nnU-Net's
        `get_patch_size` with scale (0.85, 1.25)); e.g. 48x192x192, dummy 2D → 48x225x225."""
        angle = min(self.rotation_deg, 90.0) * _DEG
        corner = np.asarray(self.patch_size, float)
        final = corner.copy()
        for axis in range(3):
            angles = [0.0, 0.0, 0.0]
            angles[axis] = angle
            final = np.maximum(final, np.abs(corner @ rotation_matrix(*angles)))
        final = (final / 0.85).astype(int)
        if self.dummy_2d:
            final[0] = self.patch_size[0]
        return tuple(int(v) for v in final)


def rotation_matrix(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about S0, S1, S2 (in that order) for row vectors: `coords @ R`."""
    c, s = math.cos(ax), math.sin(ax)
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = math.cos(ay), math.sin(ay)
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    c, s = math.cos(az), math.sin(az)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _center_crop(x: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    lo = [(s - p) // 2 for s, p in zip(x.shape[-3:], patch, strict=True)]
    return x[(..., *(slice(a, a + p) for a, p in zip(lo, patch, strict=True)))]


def _sample_factor(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgenerators' rule for multiplicative ranges around 1: half the time below 1."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1))
    return float(rng.uniform(max(lo, 1), hi))


def spatial(data: np.ndarray, seg: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (p 0.2) and scaling (p 0.2) about the centre, then crop to `cfg.patch_size`.

    Images: cubic, 0 outside; labels: `linear_labels` (-1 outside the source)."""
    patch = cfg.patch_size
    rotate = rng.random() < cfg.p_rotation
    angles = [0.0, 0.0, 0.0]
    if rotate:
        r = cfg.rotation_deg * _DEG
        angles = ([float(rng.uniform(-r, r)), 0.0, 0.0] if cfg.dummy_2d
                  else [float(rng.uniform(-r, r)) for _ in range(3)])
    scale = _sample_factor(rng, *cfg.scale) if rng.random() < cfg.p_scale else 1.0
    if not rotate and scale == 1.0:
        return _center_crop(data, patch).copy(), _center_crop(seg, patch).copy()
    matrix = rotation_matrix(*angles)
    if cfg.dummy_2d:  # in-plane only: S0 is neither rotated (angles) nor scaled
        matrix[1:, 1:] *= scale
    else:
        matrix *= scale
    # coords[a] = sum_b grid_b · M[b, a] + centre_a, by broadcasting (row vectors: grid @ M)
    axes = [np.arange(p, dtype=np.float32) - (p - 1) / 2 for p in patch]
    coords = np.empty((3, *patch), np.float32)
    for a in range(3):
        coords[a] = data.shape[a + 1] / 2 - 0.5
        for b in range(3):
            if matrix[b, a]:
                coords[a] += (np.float32(matrix[b, a]) * axes[b]).reshape(
                    [-1 if d == b else 1 for d in range(3)])
    coords = coords.reshape(3, -1)
    out = np.empty((data.shape[0], *patch), np.float32)
    if cfg.dummy_2d and data.shape[1] == patch[0]:  # S0 maps to itself: cubic in 2-D per slice
        plane = coords[1:].reshape(2, patch[0], -1)[:, 0]
        for c, k in np.ndindex(data.shape[0], patch[0]):
            out[c, k] = ndimage.map_coordinates(data[c, k], plane, order=3, mode="constant",
                                                cval=0.0).reshape(patch[1:])
    else:
        for c in range(data.shape[0]):
            out[c] = ndimage.map_coordinates(data[c], coords, order=3, mode="constant",
                                             cval=0.0).reshape(patch)
    return out, linear_labels(seg, coords).reshape(patch)


def linear_labels(seg: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Labels of `seg` at `coords (3, N)` by per-label linear interpolation and a 0.5 threshold
    (batchgenerators' `is_seg` rule; no label >= 0.5 gives 0); outside the array counts as -1.

    Gathers the corner labels once (skipping corners of zero weight, e.g. an exact S0 in dummy
    2D); only voxels whose corners disagree are weighed."""
    lo = np.floor(coords).astype(np.int64)
    frac = (coords - lo).astype(np.float32)
    strides = [int(np.prod(seg.shape[a + 1:])) for a in range(3)]
    per_axis = []
    for a in range(3):
        options = []
        for upper in (0, 1):
            w = frac[a] if upper else 1 - frac[a]
            if not w.any():
                continue
            i = lo[a] + upper
            valid = (i >= 0) & (i < seg.shape[a])
            options.append((np.clip(i, 0, seg.shape[a] - 1) * strides[a], w, valid))
        per_axis.append(options)
    flat = seg.ravel()
    labels, weights = [], []
    for (i0, w0, v0), (i1, w1, v1), (i2, w2, v2) in itertools.product(*per_axis):
        lab = flat[i0 + i1 + i2].astype(np.int16)
        lab[~(v0 & v1 & v2)] = -1
        labels.append(lab)
        weights.append(w0 * w1 * w2)
    out = labels[0].astype(seg.dtype)
    mixed = np.zeros(out.shape, bool)
    for lab in labels[1:]:
        mixed |= lab != labels[0]
    mixed = np.flatnonzero(mixed)
    if mixed.size:
        lab = np.stack([x[mixed] for x in labels])
        w = np.stack([x[mixed] for x in weights])
        total = ((lab[:, None] == lab[None]) * w[None]).sum(axis=1)  # weight of each corner's label
        best = total.argmax(axis=0)
        cols = np.arange(mixed.size)
        out[mixed] = np.where(total[best, cols] >= 0.5, lab[best, cols], 0)
    return out


def gaussian_noise(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Additive noise. As batchgenerators does, the value drawn from `noise_variance` is used as
    the standard deviation (not its square root)."""
    if rng.random() < cfg.p_noise:
        std = rng.uniform(*cfg.noise_variance)
        data = data + rng.normal(0.0, std, data.shape).astype(np.float32)
    return data


def gaussian_blur(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.p_blur:
        for c in range(data.shape[0]):
            if rng.random() < cfg.p_blur_channel:
                data[c] = ndimage.gaussian_filter(data[c], rng.uniform(*cfg.blur_sigma))
    return data


def brightness(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.p_brightness:
        data *= rng.uniform(*cfg.brightness, size=(data.shape[0], 1, 1, 1)).astype(np.float32)
    return data


def contrast(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Scale about the mean per channel, keeping the value range."""
    if rng.random() < cfg.p_contrast:
        for c in range(data.shape[0]):
            f = _sample_factor(rng, *cfg.contrast)
            lo, hi, mean = data[c].min(), data[c].max(), data[c].mean()
            data[c] = np.clip((data[c] - mean) * f + mean, lo, hi)
    return data


def low_resolution(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Nearest downsampling by a zoom in (0.5, 1), cubic upsampling back, per channel."""
    if rng.random() < cfg.p_lowres:
        shape = data.shape[1:]
        for c in range(data.shape[0]):
            if rng.random() < cfg.p_lowres_channel:
                zoom = rng.uniform(*cfg.lowres_zoom)
                small = [s if (cfg.dummy_2d and a == 0) else max(1, int(round(s * zoom)))
                         for a, s in enumerate(shape)]
                low = ndimage.zoom(data[c], [n / s for n, s in zip(small, shape, strict=True)],
                                   order=0, mode="nearest", grid_mode=True)
                data[c] = ndimage.zoom(low, [s / n for n, s in zip(low.shape, shape, strict=True)],
                                       order=3, mode="nearest", grid_mode=True)
    return data


def gamma(data: np.ndarray, rng: np.random.Generator, p: float, cfg: AugmentConfig, *,
          invert: bool) -> np.ndarray:
    """`x ← ((x - min) / range)^γ · range + min` per channel, mean and std kept."""
    if rng.random() < p:
        sign = -1.0 if invert else 1.0
        for c in range(data.shape[0]):
            x = sign * data[c]
            g = _sample_factor(rng, *cfg.gamma)
            mean, std = x.mean(), x.std()
            lo = x.min()
            rnge = x.max() - lo
            x = np.power((x - lo) / (rnge + 1e-7), g) * rnge + lo
            x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
            data[c] = sign * x
    return data


def mirror(data: np.ndarray, seg: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
           ) -> tuple[np.ndarray, np.ndarray]:
    for axis in cfg.mirror_axes:
        if rng.random() < 0.5:
            data, seg = np.flip(data, axis + 1), np.flip(seg, axis)
    return np.ascontiguousarray(data), np.ascontiguousarray(seg)


def augment(data: np.ndarray, seg: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """The whole chain on one sample at the initial patch size; returns it at `cfg.patch_size`,
    masked where `cfg.mask_channels` says, labels -1 turned to 0."""
    data, seg = spatial(data, seg, rng, cfg)
    data = gaussian_noise(data, rng, cfg)
    data = gaussian_blur(data, rng, cfg)
    data = brightness(data, rng, cfg)
    data = contrast(data, rng, cfg)
    data = low_resolution(data, rng, cfg)
    data = gamma(data, rng, cfg.p_gamma_inverted, cfg, invert=True)
    data = gamma(data, rng, cfg.p_gamma, cfg, invert=False)
    data, seg = mirror(data, seg, rng, cfg)
    return finalize(data, seg, cfg.mask_channels)


def finalize(data: np.ndarray, seg: np.ndarray, mask_channels: Sequence[bool]
             ) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's MaskTransform (zero masked channels where seg < 0), then labels -1 → 0."""
    outside = seg < 0
    for c, use in enumerate(mask_channels):
        if use:
            data[c][outside] = 0.0
    seg = np.where(outside, 0, seg)
    return data, seg
