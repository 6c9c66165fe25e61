"""Previews: each panel shows the slice it names, in the stated orientation, and the prediction's
colour and the ground truth's outline sit on the image voxel for voxel (checked on the rendered
Agg canvas against the volume, not against the drawing code)."""

import numpy as np
import pytest

from jaxmamba.infer.preview import (
    FILL_ALPHA,
    draw_preview,
    label_colors,
    largest_structure_center,
    outline_segments,
    plane_views,
)

SHAPE = (8, 10, 12)  # (z, y, x): every axis of another length
SPACING = (2.0, 1.0, 1.5)


def expected_raster(volume, axis, k):
    """The documented orientation: axial (y down, x right); coronal (z up, x right); sagittal
    (z up, y right)."""
    if axis == 0:
        return volume[k]
    return (volume[:, k, :] if axis == 1 else volume[:, :, k])[::-1]


def asymmetric_case():
    """Ground truth with an L-shaped class 2 beside a class-1 block (no plane symmetric), a
    prediction that differs from it, and a random image."""
    gt = np.zeros(SHAPE, np.int32)
    gt[1:6, 2:8, 3:10] = 1
    gt[1:3, 2:4, 3:9] = 2  # along x, at low z and y
    gt[1:6, 2:4, 3:5] = 2  # up z
    pred = gt.copy()
    pred[4:6, 5:8, 7:10] = 0  # a missed corner
    pred[6, 3:6, 4:6] = 2  # a false positive above
    image = np.random.default_rng(3).uniform(0.0, 1.0, SHAPE).astype(np.float32)
    return gt, pred, image


def test_plane_views_show_the_named_slice_in_the_stated_orientation():
    ids = np.arange(np.prod(SHAPE)).reshape(SHAPE)  # every voxel its own value
    gt, _, _ = asymmetric_case()
    center = largest_structure_center(gt)
    views = plane_views(ids, image=ids * 10, ground_truth=np.where(gt > 0, ids, 0),
                        spacing=SPACING)
    assert [v.name for v in views] == ["axial", "coronal", "sagittal"]
    for axis, view in enumerate(views):
        want = expected_raster(ids, axis, center[axis])
        assert view.axis == axis and view.index == center[axis]
        np.testing.assert_array_equal(view.prediction, want)
        np.testing.assert_array_equal(view.image, want * 10)
        np.testing.assert_array_equal(view.ground_truth,
                                      expected_raster(np.where(gt > 0, ids, 0), axis,
                                                      center[axis]))
    assert [v.aspect for v in views] == [1.0 / 1.5, 2.0 / 1.5, 2.0 / 1.0]


def test_outline_segments_are_the_pixel_edges_of_the_mask():
    mask = np.zeros((5, 6), bool)
    mask[0:3, 1:3] = True
    mask[2, 3:6] = True  # reaches the right border
    want = set()
    for r, c in zip(*np.nonzero(mask), strict=True):
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < 5 and 0 <= cc < 6 and mask[rr, cc]:
                continue
            mid = (c + dc / 2, r + dr / 2)  # (x, y) of the shared edge's midpoint
            half = (0.0, 0.5) if dc else (0.5, 0.0)
            want.add(tuple(sorted([(mid[0] - half[0], mid[1] - half[1]),
                                   (mid[0] + half[0], mid[1] + half[1])])))
    got = {tuple(sorted(map(tuple, s))) for s in outline_segments(mask).tolist()}
    assert got == want


def _pixel(ax, rgba, x, y):
    px, py = ax.transData.transform((x, y))
    return rgba[rgba.shape[0] - 1 - int(np.floor(py)), int(np.floor(px)), :3] / 255.0


def test_rendered_overlays_agree_with_the_image_voxel_for_voxel():
    gt, pred, image = asymmetric_case()
    fig = draw_preview(pred, image=image, ground_truth=gt, spacing=SPACING,
                       class_names={0: "background", 1: "block", 2: "ell"})
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    colors = label_colors(3)
    center = largest_structure_center(gt)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for axis, ax in enumerate(panels):
        img, p, g = (expected_raster(v, axis, center[axis]) for v in (image, pred, gt))
        grey = ax.images[0]
        for r, c in np.ndindex(img.shape):  # voxel centres: the image under the prediction
            want = np.asarray(grey.to_rgba(img[r, c]))[:3]
            if p[r, c]:
                want = FILL_ALPHA * np.asarray(colors(int(p[r, c])))[:3] + (1 - FILL_ALPHA) * want
            np.testing.assert_allclose(_pixel(ax, rgba, c, r), want, atol=0.02,
                                       err_msg=f"{ax.get_title()}, pixel {(r, c)}")
        edges = 0  # inner edges of the ground truth: its outline's colour
        for (r, c), (r2, c2) in [(((r, c), (r, c + 1))) for r in range(img.shape[0])
                                 for c in range(img.shape[1] - 1)] + \
                                [(((r, c), (r + 1, c))) for r in range(img.shape[0] - 1)
                                 for c in range(img.shape[1])]:
            a, b = g[r, c], g[r2, c2]
            if a == b or (a and b):  # no edge, or two classes' outlines on top of each other
                continue
            got = _pixel(ax, rgba, (c + c2) / 2, (r + r2) / 2)
            np.testing.assert_allclose(got, np.asarray(colors(int(a or b)))[:3], atol=0.1,
                                       err_msg=f"{ax.get_title()}, edge {(r, c)}-{(r2, c2)}")
            edges += 1
        assert edges > 10
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["block", "ell"]
    assert "ground truth" in legend.get_title().get_text()


@pytest.mark.parametrize("with_gt", [True, False])
def test_preview_without_foreground_or_ground_truth(with_gt, tmp_path):
    from jaxmamba.infer.preview import save_preview
    empty = np.zeros(SHAPE, np.int32)
    save_preview(tmp_path / "p.png", empty, ground_truth=empty if with_gt else None)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
