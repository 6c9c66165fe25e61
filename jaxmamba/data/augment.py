"""nnU-Net's training augmentation chain, in order (paper_spec §4.1, batchgenerators 0.25).

Arrays are one sample, channels-first: `data (C, S0, S1, S2)` float32 and `seg (S0, S1, S2)`
int (-1 = outside the image or the non-zero mask). Each transform takes a `numpy.random.Generator`
so the chain is deterministic from the pipeline's per-sample seed. "Dummy 2D" (anisotropic
patches, `max(patch) / patch[0] > 3`) rotates and scales in the (S1, S2) plane only (±180°) and
never simulates low resolution along S0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_DEG = math.pi / 180


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the chain; the defaults are nnU-Net's (paper_spec §4.1)."""

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

    Images: cubic, 0 outside; labels: per-label linear + 0.5 threshold, -1 outside."""
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
    grid = np.stack(np.meshgrid(*[np.arange(p, dtype=np.float32) - (p - 1) / 2 for p in patch],
                                indexing="ij")).reshape(3, -1)
    matrix = rotation_matrix(*angles).astype(np.float32)
    if cfg.dummy_2d:  # in-plane only: S0 is neither rotated (angles) nor scaled
        matrix[1:, 1:] *= scale
    else:
        matrix *= scale
    coords = (grid.T @ matrix).T
    for a in range(3):
        coords[a] += data.shape[a + 1] / 2 - 0.5
    out = np.empty((data.shape[0], *patch), np.float32)
    for c in range(data.shape[0]):
        out[c] = ndimage.map_coordinates(data[c], coords, order=3, mode="constant",
                                         cval=0.0).reshape(patch)
    out_seg = np.full(patch, -1, seg.dtype)
    inside = ndimage.map_coordinates(np.ones(seg.shape, np.float32), coords, order=1,
                                     mode="constant", cval=0.0).reshape(patch) >= 0.5
    out_seg[inside] = 0
    for value in np.unique(seg):
        if value > 0:
            m = ndimage.map_coordinates((seg == value).astype(np.float32), coords, order=1,
                                        mode="constant", cval=0.0).reshape(patch)
            out_seg[m >= 0.5] = value
    return out, out_seg


def gaussian_noise(data: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.p_noise:
        std = math.sqrt(rng.uniform(*cfg.noise_variance))
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
