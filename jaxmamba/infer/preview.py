"""Preview PNGs: three orthogonal slices through the largest structure (DESIGN §8).

The image is drawn in grey, the prediction as translucent colour and the ground truth (when given)
as contours of the same colours. Volumes are in nnU-Net axis order (z, y, x); `spacing` sets the
aspect ratio so anisotropic volumes are not squashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from scipy import ndimage

from jaxmamba.atomic import atomic_path

_AXIS_NAMES = ("axial", "coronal", "sagittal")


def largest_structure_center(labels: np.ndarray) -> tuple[int, ...]:
    """Centre of mass of the largest 26-connected foreground component (the volume centre if
    there is no foreground), rounded to a voxel inside it when possible."""
    fg = labels > 0
    if not fg.any():
        return tuple(s // 2 for s in labels.shape)
    components, n = ndimage.label(fg, structure=np.ones((3,) * labels.ndim, bool))
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    largest = components == (1 + int(np.argmax(sizes)))
    center = np.round(ndimage.center_of_mass(largest)).astype(int)
    if not largest[tuple(center)]:  # a curved structure: take its voxel nearest to the centre
        voxels = np.argwhere(largest)
        center = voxels[np.argmin(((voxels - center) ** 2).sum(1))]
    return tuple(int(c) for c in center)


def save_preview(path: str | Path, prediction: np.ndarray, *, image: np.ndarray | None = None,
                 ground_truth: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                 num_classes: int | None = None) -> None:
    """Write a PNG with the three orthogonal slices through the largest structure, atomically.

    `prediction`, `ground_truth`: label maps (z, y, x); `image`: one channel (z, y, x). The slices
    go through the largest structure of the ground truth when given, else of the prediction.
    """
    center = largest_structure_center(ground_truth if ground_truth is not None else prediction)
    k = int(max(prediction.max(), 0 if ground_truth is None else ground_truth.max()) + 1)
    k = max(k, num_classes or 0)
    colors = _label_colors(k)
    fig = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for axis, ax in enumerate(fig.subplots(1, 3)):
        sl = tuple(center[a] if a == axis else slice(None) for a in range(3))
        rows, cols = [a for a in range(3) if a != axis]
        aspect = spacing[rows] / spacing[cols]
        origin = "upper" if axis == 0 else "lower"
        if image is not None:
            ax.imshow(image[sl], cmap="gray", aspect=aspect, origin=origin, interpolation="nearest")
        else:
            ax.imshow(np.zeros(prediction[sl].shape), cmap="gray", aspect=aspect, origin=origin)
        pred = np.ma.masked_equal(prediction[sl], 0)
        ax.imshow(pred, cmap=colors, vmin=0, vmax=k - 1, alpha=0.45, aspect=aspect, origin=origin,
                  interpolation="nearest")
        if ground_truth is not None:
            gt = ground_truth[sl]
            for label in np.unique(gt[gt > 0]):
                ax.contour(gt == label, levels=[0.5], colors=[colors(int(label))], linewidths=1.0,
                           origin=origin)
        ax.set_title(f"{_AXIS_NAMES[axis]} slice {center[axis]}", fontsize=9)
        ax.set_axis_off()
    legend = "prediction: filled" + ("; ground truth: contours" if ground_truth is not None else "")
    fig.suptitle(f"{title}    {legend}".strip(), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _label_colors(k: int) -> ListedColormap:
    base = np.array([(0.0, 0.0, 0.0, 1.0)] + [
        (*c, 1.0) for c in ((0.90, 0.10, 0.10), (0.10, 0.75, 0.10), (0.15, 0.35, 0.95),
                            (0.95, 0.85, 0.10), (0.90, 0.20, 0.90), (0.10, 0.85, 0.85),
                            (1.00, 0.55, 0.10), (0.55, 0.25, 0.90), (0.55, 0.80, 0.20),
                            (0.95, 0.50, 0.60), (0.45, 0.30, 0.15), (0.20, 0.50, 0.50))])
    return ListedColormap(base[np.r_[0, 1 + (np.arange(max(k - 1, 1)) % (len(base) - 1))]])
