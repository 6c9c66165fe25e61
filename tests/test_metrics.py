"""Metrics against hand-computed values (cubes, spheres, empty masks) and a brute-force surface."""

import math

import numpy as np
import pytest
from conftest import assert_close_to
from scipy.spatial.distance import cdist

from jaxmamba.infer.metrics import (
    BRATS_REGIONS,
    dice,
    evaluate_case,
    hd95,
    mean_metrics,
    nsd,
    parse_regions,
    regions_from_labels,
    surface_distances,
)


def _cube_with_outliers():
    """A 3x3x3 cube (26 surface voxels) and the same cube plus four isolated voxels.

    The outliers lie 3, 4, 5 and 6 voxels from the face centres of the cube, along axes 0, 2, 2, 1.
    """
    gt = np.zeros((24, 24, 24), bool)
    gt[10:13, 10:13, 10:13] = True
    pred = gt.copy()
    for voxel in [(15, 11, 11), (11, 11, 16), (11, 11, 5), (11, 18, 11)]:
        pred[voxel] = True
    return pred, gt


def test_cube_with_outliers_hand_values():
    pred, gt = _cube_with_outliers()
    assert dice(pred, gt) == pytest.approx(2 * 27 / (27 + 31))
    to_gt, to_pred = surface_distances(pred, gt)
    assert sorted(to_gt) == [0.0] * 26 + [3.0, 4.0, 5.0, 6.0]
    assert np.array_equal(to_pred, np.zeros(26))
    # 56 pooled distances: 52 zeros then 3, 4, 5, 6; the 95th percentile sits at index
    # 0.95 * 55 = 52.25, between 3 and 4
    assert hd95(pred, gt) == pytest.approx(3.25)
    # spacing 2 mm along axis 0 makes the first outlier 6 mm away: tail 4, 5, 6, 6
    assert hd95(pred, gt, spacing=(2.0, 1.0, 1.0)) == pytest.approx(4.25)
    assert nsd(pred, gt, 4.5) == pytest.approx((26 + 2 + 26) / 56)
    assert nsd(pred, gt, 4.5, spacing=(2.0, 1.0, 1.0)) == pytest.approx((26 + 1 + 26) / 56)
    assert nsd(pred, gt, 6.0) == 1.0


def test_shifted_single_voxels():
    a, b = np.zeros((12, 5, 5), bool), np.zeros((12, 5, 5), bool)
    a[2, 2, 2], b[9, 2, 2] = True, True
    assert dice(a, b) == 0.0
    assert hd95(a, b) == pytest.approx(7.0)
    assert hd95(a, b, spacing=(1.5, 1.0, 1.0)) == pytest.approx(10.5)
    assert nsd(a, b, 10.0, spacing=(1.5, 1.0, 1.0)) == 0.0


def _ball(shape, center, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing, strict=True))
    return d2 <= radius**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
def test_concentric_spheres(spacing):
    shape = (24, 40, 40) if spacing[0] == 2.0 else (40, 40, 40)
    center = [(s - 1) / 2 for s in shape]
    outer, inner = _ball(shape, center, 12, spacing), _ball(shape, center, 8, spacing)
    # volumes of balls of radius 12 and 8 mm, up to discretisation
    assert dice(inner, outer) == pytest.approx(2 * 8**3 / (12**3 + 8**3), rel=0.03)
    # every surface point is about 4 mm from the other surface
    assert hd95(inner, outer, spacing) == pytest.approx(4.0, abs=1.0)
    assert nsd(inner, outer, 2.0, spacing) < 0.05
    assert nsd(inner, outer, 6.0, spacing) == 1.0


def _brute_surface(mask):
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def test_surface_distances_match_brute_force():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(7)
    spacing = (2.5, 0.8, 1.3)
    for _ in range(3):
        pred = binary_dilation(rng.random((10, 14, 12)) < 0.02, iterations=2)
        gt = binary_dilation(rng.random((10, 14, 12)) < 0.02, iterations=2)
        to_gt, to_pred = surface_distances(pred, gt, spacing)
        sp, sg = (np.argwhere(_brute_surface(m)) * spacing for m in (pred, gt))
        pairwise = cdist(sp, sg)
        assert_close_to(np.sort(to_gt), np.sort(pairwise.min(1)), rtol=1e-6)
        assert_close_to(np.sort(to_pred), np.sort(pairwise.min(0)), rtol=1e-6)
        want = np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95)
        assert hd95(pred, gt, spacing) == pytest.approx(want)


def test_empty_masks():
    empty, full = np.zeros((6, 6, 6), bool), np.zeros((6, 6, 6), bool)
    full[2:4, 2:4, 2:4] = True
    assert math.isnan(dice(empty, empty)) and dice(empty, empty, empty_dice=1.0) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert math.isnan(hd95(empty, empty)) and math.isnan(hd95(full, empty))
    assert hd95(empty, full, empty_hd95=0.0) == 0.0
    assert math.isnan(nsd(empty, empty, 1.0)) and nsd(full, empty, 1.0) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(full, empty)


def test_dice_agrees_with_nnunet_definition():
    rng = np.random.default_rng(3)
    pred, gt = rng.integers(0, 3, (8, 9, 10)), rng.integers(0, 3, (8, 9, 10))
    got = evaluate_case(pred, gt, {"a": (1,), "b": (2,)})
    for name, label in (("a", 1), ("b", 2)):
        p, g = pred == label, gt == label
        tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
        m = got[name]
        counts = (m["TP"], m["FP"], m["FN"], m["n_pred"], m["n_ref"])
        assert counts == (tp, fp, fn, p.sum(), g.sum())
        assert m["Dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_brats_regions_and_means():
    gt = np.zeros((4, 4, 4), int)
    gt[0, :2], gt[1, :2], gt[2, :2] = 1, 2, 3          # 8 voxels of each label
    pred = gt.copy()
    pred[2, :2] = 2                                    # enhancing tumour predicted as core
    per_case = evaluate_case(pred, gt, BRATS_REGIONS, spacing=(1, 1, 1), nsd_tolerance=1.0)
    assert per_case["WT"]["Dice"] == 1.0 and per_case["TC"]["Dice"] == 1.0
    assert per_case["ET"]["Dice"] == 0.0 and math.isnan(per_case["ET"]["HD95"])
    assert per_case["WT"]["HD95"] == 0.0 and per_case["WT"]["NSD"] == 1.0
    empty_case = evaluate_case(np.zeros_like(gt), np.zeros_like(gt), BRATS_REGIONS,
                               spacing=(1, 1, 1), nsd_tolerance=1.0)
    means = mean_metrics([per_case, empty_case])
    assert means["ET"]["Dice"] == 0.0 and means["WT"]["Dice"] == 1.0   # NaN cases left out
    assert means["mean"]["Dice"] == pytest.approx(2 / 3)
    assert means["WT"]["TP"] == 24 / 2


def test_region_definitions():
    assert regions_from_labels({"background": 0, "a": 1, "b": 2}) == {"a": (1,), "b": (2,)}
    assert regions_from_labels({"background": 0, "whole tumor": [1, 2, 3], "enhancing": [3]}) == {
        "whole tumor": (1, 2, 3), "enhancing": (3,)}
    assert parse_regions("WT=1,2,3; TC=2,3;ET=3") == BRATS_REGIONS
    with pytest.raises(ValueError, match="NAME=LABEL"):
        parse_regions("WT:1,2")
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), {"a": (1,)})
