"""Sliding-window prediction of a whole volume, as nnU-Net does it.

The volume is padded to at least the patch size, cut into windows at nnU-Net's positions (50%
overlap by default), each window is predicted (optionally under mirror test-time augmentation,
logits averaged over all flip combinations), weighted by a Gaussian importance map and accumulated;
the sum is divided by the summed weights and cropped back to the input size.

How it runs (stride, mirroring, windows per call, where the sums live, the devices) is one
`WindowOptions` value, which prediction passes through unchanged.

Arrays are channels-last in nnU-Net axis order: an image is `(S0, S1, S2, C)`, the
network is any `apply_fn(windows (n, *patch, C)) -> logits (n, *patch, K)`, the result is
`(S0, S1, S2, K)` float32 logits. Windows are batched on the device and sharded over the `data` axis
of a mesh when it has several devices (and each window along S0 over its `spatial` axis, if any);
the accumulator lives on the first device when it fits there and on the host otherwise (also, with
`accumulate="auto"`, when the device runs out of memory).

Deviation from nnU-Net, deliberately: accumulation is in float32 (nnU-Net uses float16 buffers).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from jaxmamba.choices import ACCUMULATE, Accumulate, check
from jaxmamba.ops.mesh import DATA_AXIS, local_mesh, replicated, volume_sharding

ApplyFn = Callable[[jax.Array], jax.Array]

#: Fraction of the first device's free memory the accumulator may take under `accumulate="auto"`.
_DEVICE_MEMORY_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class WindowOptions:
    """How sliding-window prediction runs (`jaxmamba predict`'s options; nnU-Net's defaults).

    step_size: window stride as a fraction of the patch (0.5 = nnU-Net's 50% overlap).
    mirror_axes: spatial axes to mirror for test-time augmentation (all `2^k` combinations,
      logits averaged); `None` or `()` switches mirroring off.
    batch_size: windows per network call, rounded up to a multiple of the mesh's `data` axis
      (default: one per device).
    accumulate: where the sums live: `"device"` (first device of the mesh), `"host"` (numpy), or
      `"auto"` (the device when the accumulator takes under half its free memory).
    mesh: devices to shard windows over (axis `data`; `spatial` splits each window); default
      this process's devices (`jaxmamba.ops.mesh.local_mesh`).
    """

    step_size: float = 0.5
    mirror_axes: tuple[int, ...] | None = (0, 1, 2)
    batch_size: int | None = None
    accumulate: Accumulate = "auto"
    mesh: Mesh | None = None

    def __post_init__(self):
        check(self.accumulate, ACCUMULATE, "accumulate")


#: nnU-Net's window settings on this process's devices.
DEFAULT_WINDOW = WindowOptions()


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int],
                  step_size: float = 0.5) -> list[list[int]]:
    """Window start positions per axis (nnU-Net `compute_steps_for_sliding_window`).

    `n = ceil((size - patch) / (step_size * patch)) + 1` windows per axis, at
    `round(i * (size - patch) / (n - 1))`. Requires `size >= patch` on every axis.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size {step_size} must be in (0, 1]")
    steps = []
    for axis, (size, patch) in enumerate(zip(image_size, patch_size, strict=True)):
        if size < patch:
            raise ValueError(f"axis {axis}: image size {size} is smaller than the patch {patch}; "
                             f"pad first (pad_to_patch)")
        n = int(math.ceil((size - patch) / (step_size * patch))) + 1
        stride = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8,
                            value_scaling_factor: float = 10.0) -> np.ndarray:
    """nnU-Net's Gaussian window weights, `(*patch_size,)` float32.

    A unit impulse at `patch // 2` blurred with sigma `patch * sigma_scale` per axis, scaled to a
    maximum of `value_scaling_factor`, zeros replaced by the smallest non-zero value.
    """
    impulse = np.zeros(tuple(patch_size), np.float64)
    impulse[tuple(p // 2 for p in patch_size)] = 1.0
    g = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g = (g / (g.max() / value_scaling_factor)).astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The identity and every non-empty combination of the spatial `axes` (2^len(axes) in all)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(tuple(axes), r)]


def pad_to_patch(image: np.ndarray,
                 patch_size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the spatial axes of `image (*S, C)` to at least `patch_size`, centred as nnU-Net.

    Returns the padded array and the slices that crop it back to `S`.
    """
    pads, crop = [], []
    for size, patch in zip(image.shape[:-1], patch_size, strict=True):
        diff = max(patch - size, 0)
        pads.append((diff // 2, diff - diff // 2))
        crop.append(slice(diff // 2, diff // 2 + size))
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, [*pads, (0, 0)], mode="constant", constant_values=0)
    return image, tuple(crop)


def predict_logits(apply_fn: ApplyFn, image: np.ndarray, patch_size: Sequence[int], *,
                   num_classes: int, window: WindowOptions = DEFAULT_WINDOW,
                   progress: bool | str = False) -> np.ndarray:
    """Sliding-window logits of a whole volume (`predict_sliding_window_return_logits`).

    Args:
      apply_fn: the network, `(n, *patch, C) -> (n, *patch, num_classes)`; jit it beforehand, with
        its parameters replicated over `window.mesh` when it has several devices.
      image: `(S0, S1, S2, C)` preprocessed volume; any size (padded to the patch, cropped back).
      patch_size: the plan's patch size.
      window: stride, mirroring, windows per call, where the sums live, devices (`WindowOptions`).
      progress: show a progress bar over windows (a string is used as its description).

    Returns:
      `(S0, S1, S2, num_classes)` float32 numpy logits, Gaussian-weighted means over windows.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != len(patch_size) + 1:
        raise ValueError(f"image has shape {image.shape}; expected (*spatial, channels) with "
                         f"{len(patch_size)} spatial axes")
    patch = tuple(int(p) for p in patch_size)
    padded, crop = pad_to_patch(image, patch)
    starts = np.array(list(itertools.product(*compute_steps(padded.shape[:-1], patch,
                                                           window.step_size))), np.int32)
    gauss = gaussian_importance_map(patch)
    mesh = local_mesh() if window.mesh is None else window.mesh
    n_dev = mesh.shape[DATA_AXIS]  # windows in parallel; a `spatial` axis splits each window
    batch_size = n_dev * max(1, -(-(window.batch_size or n_dev) // n_dev))
    flips = mirror_combinations(window.mirror_axes or ())
    accumulate = window.accumulate

    acc_shape = (*padded.shape[:-1], num_classes)
    on_device = _choose_device(accumulate, mesh.devices.flat[0], 4 * math.prod(acc_shape))
    args = (apply_fn, padded, starts, gauss, flips, num_classes, mesh, batch_size, progress)
    try:
        acc, weights = _sum_windows(*args, on_device=on_device)
    except Exception as err:  # XlaRuntimeError; its class moved between jax versions
        if not (on_device and accumulate == "auto" and "RESOURCE_EXHAUSTED" in str(err)):
            raise
        warnings.warn(f"the device ran out of memory while predicting a volume of "
                      f"{list(padded.shape[:-1])}; summing the windows on the host instead",
                      stacklevel=2)
        acc, weights = _sum_windows(*args, on_device=False)
    logits = np.asarray(acc)[crop] / weights[crop][..., None]
    return logits.astype(np.float32, copy=False)


def _sum_windows(apply_fn: ApplyFn, padded: np.ndarray, starts: np.ndarray, gauss: np.ndarray,
                 flips: list[tuple[int, ...]], num_classes: int, mesh: Mesh, batch_size: int,
                 progress: bool | str, *, on_device: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted sums of the windows' logits `(*S, K)` and of the weights `(*S,)`."""
    patch = gauss.shape
    # windows over `data`, each split along S0 over `spatial` when it has several devices
    window_sharding = volume_sharding(mesh, (batch_size, *patch))
    acc_device = mesh.devices.flat[0]
    acc_shape = (*padded.shape[:-1], num_classes)

    image_dev = jax.device_put(padded, replicated(mesh))
    gauss_dev = jax.device_put(gauss, acc_device) if on_device else None
    acc = (jax.device_put(np.zeros(acc_shape, np.float32), acc_device) if on_device
           else np.zeros(acc_shape, np.float32))
    weights = np.zeros(padded.shape[:-1], np.float32)

    bar = tqdm(total=len(starts), desc=progress if isinstance(progress, str) else "windows",
               unit="win", disable=not progress, leave=False)
    pending = None  # the previous batch: waited for after the next is queued, for the bar
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        n_valid = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n_valid, 0)])
        windows = jax.device_put(_gather(image_dev, jax.device_put(chunk, replicated(mesh)),
                                         patch), window_sharding)
        logits = _mirrored(apply_fn, windows, flips, num_classes)
        if on_device:
            on_acc = jax.device_put((logits, chunk, n_valid), acc_device)
            acc = _accumulate(acc, on_acc[0], gauss_dev, *on_acc[1:])
        else:
            _accumulate_host(acc, jax.device_get(logits)[:n_valid], gauss, chunk[:n_valid])
        for s in chunk[:n_valid]:
            weights[tuple(slice(a, a + p) for a, p in zip(s, patch, strict=True))] += gauss
        if pending is not None:
            bar.update(_wait(*pending))
        pending = (logits, n_valid)
    bar.update(_wait(*pending))
    bar.close()
    return np.asarray(jax.device_get(acc)), weights


def _choose_device(accumulate: Accumulate, device: jax.Device, nbytes: int) -> bool:
    if accumulate != "auto":
        return accumulate == "device"
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return True  # no memory accounting (CPU): the "device" is host memory anyway
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return nbytes < _DEVICE_MEMORY_FRACTION * free


def _wait(logits: jax.Array, n: int) -> int:
    logits.block_until_ready()
    return n


def _mirrored(apply_fn: ApplyFn, windows: jax.Array, flips: list[tuple[int, ...]],
              num_classes: int) -> jax.Array:
    """Mean over mirrorings of `flip(apply_fn(flip(windows)))`, float32 `(n, *patch, K)`."""
    flips = tuple(flips)
    outputs = []
    for x in _flip_each(windows, flips):
        y = apply_fn(x)
        if y.shape != (*windows.shape[:-1], num_classes):
            raise ValueError(f"apply_fn returned shape {y.shape} for windows {windows.shape}; "
                             f"expected {(*windows.shape[:-1], num_classes)} (num_classes="
                             f"{num_classes})")
        outputs.append(y)
    return _unflip_mean(tuple(outputs), flips)


@jax.jit(static_argnums=1)
def _flip_each(windows: jax.Array, flips: tuple[tuple[int, ...], ...]) -> tuple[jax.Array, ...]:
    """`windows (n, *patch, C)` flipped along each combination of spatial axes (one program)."""
    return tuple(jnp.flip(windows, tuple(a + 1 for a in axes)) for axes in flips)


@jax.jit(static_argnums=1)
def _unflip_mean(outputs: tuple[jax.Array, ...], flips: tuple[tuple[int, ...], ...]) -> jax.Array:
    flipped = [jnp.flip(y.astype(jnp.float32), tuple(a + 1 for a in axes))
               for y, axes in zip(outputs, flips, strict=True)]
    return sum(flipped[1:], flipped[0]) / len(flipped)


@jax.jit(static_argnums=2)
def _gather(image: jax.Array, starts: jax.Array, patch: tuple[int, ...]) -> jax.Array:
    """`(n, *patch, C)` windows of `image (*S, C)` at `starts (n, 3)`."""
    def one(start):
        return jax.lax.dynamic_slice(image, (*start, 0), (*patch, image.shape[-1]))
    return jax.vmap(one)(starts)


@jax.jit(donate_argnums=0)
def _accumulate(acc: jax.Array, logits: jax.Array, gauss: jax.Array, starts: jax.Array,
                n_valid: jax.Array) -> jax.Array:
    """Add `logits[i] * gauss` into `acc (*S, K)` at `starts[i]` for the first `n_valid` windows."""
    def body(i, acc):
        start = (*starts[i], 0)
        cur = jax.lax.dynamic_slice(acc, start, logits.shape[1:])
        return jax.lax.dynamic_update_slice(acc, cur + logits[i] * gauss[..., None], start)
    return jax.lax.fori_loop(0, n_valid, body, acc)


def _accumulate_host(acc: np.ndarray, logits: np.ndarray, gauss: np.ndarray,
                     starts: np.ndarray) -> None:
    for window, start in zip(logits, starts, strict=True):
        sl = tuple(slice(a, a + p) for a, p in zip(start, gauss.shape, strict=True))
        acc[sl] += window * gauss[..., None]
