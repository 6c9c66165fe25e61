"""Preview PNGs: three orthogonal slices through the largest structure.

Volumes are in nnU-Net axis order (z, y, x). Every panel is a raster drawn with its first row on
top: the axial slice `z = k` shows (y, x), y downwards; the coronal slice `y = k` shows (z, x) and
the sagittal slice `x = k` shows (z, y), both with z upwards. The image is grey, the prediction is
translucent colour and the ground truth (when given) is the outline of its voxels in the same
colour, with a legend naming the classes. `plane_views` returns the rasters exactly as drawn and
`outline_segments` the outline in the same pixel coordinates (pixel `(r, c)` covers
`[c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]`, as `imshow` draws it), so the overlays and the image
agree voxel for voxel. `spacing` sets each panel's aspect ratio, so anisotropic volumes are not
squashed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from jaxmamba.atomic import atomic_path

AXIS_NAMES = ("axial", "coronal", "sagittal")
FILL_ALPHA = 0.45  # opacity of the prediction's colour over the image
OUTLINE_WIDTH = 1.5  # points (2 pixels at the PNG's 100 dpi)


@dataclasses.dataclass(frozen=True)
class PlaneView:
    """One panel: the slice `index` along `axis`, as 2-D rasters with the top row first."""

    name: str
    axis: int
    index: int
    image: np.ndarray | None
    prediction: np.ndarray
    ground_truth: np.ndarray | None
    aspect: float  # on-screen height / width of one pixel: spacing of the rows / of the columns


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


def plane_views(prediction: np.ndarray, *, image: np.ndarray | None = None,
                ground_truth: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[PlaneView]:
    """The axial, coronal and sagittal panels through the largest structure of the ground truth
    (of the prediction without one), each raster as drawn: top row first."""
    center = largest_structure_center(ground_truth if ground_truth is not None else prediction)
    views = []
    for axis, name in enumerate(AXIS_NAMES):
        rows, cols = (a for a in range(3) if a != axis)

        def cut(volume, axis=axis):
            if volume is None:
                return None
            plane = np.take(volume, center[axis], axis=axis)
            return plane if axis == 0 else plane[::-1]  # coronal, sagittal: z upwards

        views.append(PlaneView(name, axis, center[axis], cut(image), cut(prediction),
                               cut(ground_truth), float(spacing[rows] / spacing[cols])))
    return views


def outline_segments(mask: np.ndarray) -> np.ndarray:
    """The pixel edges between `mask` and the rest (the raster's border included): `(n, 2, 2)`
    segments of `(x, y) = (column, row)` end points in the raster's pixel coordinates."""
    m = np.pad(np.asarray(mask, bool), 1)
    r, c = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # between columns c - 1 and c of row r
    vertical = np.stack([np.stack([c - 0.5, r - 0.5], -1), np.stack([c - 0.5, r + 0.5], -1)], 1)
    r, c = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # between rows r - 1 and r of column c
    horizontal = np.stack([np.stack([c - 0.5, r - 0.5], -1), np.stack([c + 0.5, r - 0.5], -1)], 1)
    return np.concatenate([vertical, horizontal]).astype(np.float64).reshape(-1, 2, 2)


def draw_preview(prediction: np.ndarray, *, image: np.ndarray | None = None,
                 ground_truth: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                 num_classes: int | None = None,
                 class_names: Mapping[int, str] | None = None) -> Figure:
    """The preview figure (Agg canvas): three panels of `plane_views` and a legend.

    `prediction`, `ground_truth`: label maps (z, y, x); `image`: one channel (z, y, x);
    `class_names`: label value -> name (dataset.json `labels`; missing ones read "label N").
    """
    views = plane_views(prediction, image=image, ground_truth=ground_truth, spacing=spacing)
    names = dict(class_names or {})
    k = int(max(prediction.max(), 0 if ground_truth is None else ground_truth.max()) + 1)
    k = max(k, num_classes or 0, max(names, default=0) + 1)
    colors = label_colors(k)
    lo, hi = _window(image)
    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for view, ax in zip(views, fig.subplots(1, 3), strict=True):
        grey = view.image if view.image is not None else np.zeros(view.prediction.shape)
        ax.imshow(grey, cmap="gray", vmin=lo, vmax=hi, aspect=view.aspect,
                  interpolation="nearest")
        ax.imshow(np.ma.masked_equal(view.prediction, 0), cmap=colors, vmin=0, vmax=k - 1,
                  alpha=FILL_ALPHA, aspect=view.aspect, interpolation="nearest")
        if view.ground_truth is not None:
            for label in np.unique(view.ground_truth[view.ground_truth > 0]):
                ax.add_collection(LineCollection(
                    outline_segments(view.ground_truth == label), colors=[colors(int(label))],
                    linewidths=OUTLINE_WIDTH, capstyle="projecting"), autolim=False)
        ax.set_title(f"{view.name}: {'zyx'[view.axis]} = {view.index}", fontsize=9)
        ax.set_axis_off()
    handles = [Patch(facecolor=(*colors(v)[:3], FILL_ALPHA), edgecolor=colors(v),
                     label=names.get(v, f"label {v}")) for v in range(1, k)]
    how = "prediction: filled" + ("; ground truth: outline" if ground_truth is not None else "")
    fig.legend(handles=handles or [Patch(color="none", label="no foreground")],
               loc="outside lower center", ncols=max(min(len(handles), 8), 1), fontsize=9,
               frameon=False, title=how, title_fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_preview(path: str | Path, prediction: np.ndarray, **options) -> None:
    """Write `draw_preview(prediction, **options)` as a PNG at `path`, atomically."""
    fig = draw_preview(prediction, **options)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def label_colors(k: int) -> ListedColormap:
    """`k` colours for labels 0..k-1 (0 black; the others cycle through twelve distinct ones)."""
    base = np.array([(0.0, 0.0, 0.0, 1.0)] + [
        (*c, 1.0) for c in ((0.90, 0.10, 0.10), (0.10, 0.75, 0.10), (0.15, 0.35, 0.95),
                            (0.95, 0.85, 0.10), (0.90, 0.20, 0.90), (0.10, 0.85, 0.85),
                            (1.00, 0.55, 0.10), (0.55, 0.25, 0.90), (0.55, 0.80, 0.20),
                            (0.95, 0.50, 0.60), (0.45, 0.30, 0.15), (0.20, 0.50, 0.50))])
    return ListedColormap(base[np.r_[0, 1 + (np.arange(max(k - 1, 1)) % (len(base) - 1))]])


def _window(image: np.ndarray | None) -> tuple[float, float]:
    """Grey levels: the 0.5-99.5 percentiles of the whole volume (the same in every panel)."""
    if image is None:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)
