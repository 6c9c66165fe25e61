"""The offline real-MRI demo dataset: builds offline, checks clean, honest held-out split."""

import socket

import nibabel as nib
import numpy as np
import pytest

from jaxmamba.data import check_dataset, fold_cases, preprocess_dataset, train_iterator


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import jaxmamba.datasets as d

    def no_network(*args, **kwargs):
        raise AssertionError("the demo builder tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NILEARN_DATA", str(tmp_path_factory.mktemp("empty_nilearn_data")))
        mp.setattr(socket.socket, "connect", no_network)
        return d.build("demo", tmp_path_factory.mktemp("demo") / "Dataset950_MNITissue")


def _regions(root, split):
    """Voxel boxes (x, y, z) of each block in the template grid (2 mm, origin from nilearn)."""
    from nilearn import datasets
    template = datasets.load_mni152_template(resolution=2)
    inv = np.linalg.inv(template.affine)
    boxes = []
    for f in sorted((root / f"labels{split}").glob("*.nii.gz")):
        img = nib.load(f)
        lo = np.rint(inv @ img.affine @ [0, 0, 0, 1])[:3].astype(int)
        boxes.append((lo, lo + np.array(img.shape)))
    return boxes, template.shape


def test_demo_is_clean_and_held_out_split_is_honest(demo):
    errors, warnings = check_dataset(demo)
    assert errors == [] and warnings == []
    train, shape = _regions(demo, "Tr")
    test, _ = _regions(demo, "Ts")
    assert len(train) >= 5 and len(test) >= 5
    occupied = np.zeros(shape, np.int8)
    for lo, hi in train:
        occupied[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    mirrored = occupied | occupied[::-1]  # the template is left-right symmetric
    for lo, hi in test:  # no test voxel, nor its mirror image, is ever a training voxel
        assert not mirrored[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()
    values = set()
    for f in (demo / "labelsTr").glob("*.nii.gz"):
        values |= set(np.unique(np.asarray(nib.load(f).dataobj)).tolist())
    assert values == {0, 1, 2, 3}


def test_demo_preprocesses_and_samples(demo, tmp_path):
    plan, errors = preprocess_dataset(demo, tmp_path / "cache", progress=False)
    assert errors == []
    assert plan.spacing == (2.0, 2.0, 2.0) and max(plan.patch_size) <= 32
    train, val = fold_cases(tmp_path / "cache", 0)
    batch = next(train_iterator(tmp_path / "cache", plan, train, seed=0, batch_size=2))
    assert batch["image"].shape == (2, *plan.patch_size, 1)
    assert (batch["target"][0][1] > 0).any()
