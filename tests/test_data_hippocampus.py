"""Real data end to end: Dataset004_Hippocampus through check → plan → preprocess → pipeline."""

import shutil

import numpy as np
import pytest
from conftest import hippocampus_raw

from jaxmamba.data import check_dataset, fold_cases, load_plan, preprocess_dataset, train_iterator
from jaxmamba.data.dataset import RawDataset
from jaxmamba.data.fingerprint import extract_fingerprint
from jaxmamba.data.planner import plan_from_fingerprint

N_CASES = 8


@pytest.fixture(scope="module")
def hippocampus(datasets_dir, tmp_path_factory):
    """A raw folder holding the first few real cases (symlinks) of Dataset004_Hippocampus."""
    return hippocampus_raw(datasets_dir, tmp_path_factory.mktemp("hippo")
                           / "Dataset004_Hippocampus", N_CASES)


def test_check_plan_preprocess_pipeline(hippocampus, tmp_path):
    errors, warnings = check_dataset(hippocampus)
    assert errors == [] and warnings == []
    fp = extract_fingerprint(RawDataset.open(hippocampus), progress=False)
    plan = plan_from_fingerprint(fp, RawDataset.open(hippocampus).meta, name="hippo")
    # nnU-Net plans this task at 1 mm with a 40x56x40 patch, 4 stages and per-case z-score
    assert plan.spacing == (1.0, 1.0, 1.0)
    assert plan.patch_size == (40, 56, 40)
    assert plan.num_stages == 4
    assert plan.normalization_schemes == ("ZScoreNormalization",)
    assert plan.use_mask_for_norm == (False,)

    cache = tmp_path / "cache"
    plan2, errors = preprocess_dataset(hippocampus, cache, plan, progress=False)
    assert errors == [] and plan2 == load_plan(cache).replace(source=plan2.source)
    train, val = fold_cases(cache, 0)
    assert len(train) + len(val) == N_CASES and not set(train) & set(val)
    batch = next(train_iterator(cache, plan2, train, seed=0, batch_size=2))
    assert batch["image"].shape == (2, 40, 56, 40, 1) and batch["image"].dtype == np.float32
    assert [t.shape for t in batch["target"]] == [(2, 40, 56, 40), (2, 20, 28, 20),
                                                  (2, 10, 14, 10)]
    assert np.isfinite(batch["image"]).all()
    assert set(np.unique(batch["target"][0])) <= {0, 1, 2}
    # the second sample of a batch of 2 is forced to hold foreground (nnU-Net's rule)
    assert (batch["target"][0][1] > 0).any()

    # idempotent: a second run does nothing; a half-written case (no JSON) is redone
    (cache / "3d_fullres" / f"{train[0]}.json").unlink()
    mtime = (cache / "3d_fullres" / f"{train[1]}.npy").stat().st_mtime_ns
    _, errors = preprocess_dataset(hippocampus, cache, progress=False)
    assert errors == []
    assert (cache / "3d_fullres" / f"{train[0]}.json").is_file()
    assert (cache / "3d_fullres" / f"{train[1]}.npy").stat().st_mtime_ns == mtime
    shutil.rmtree(cache)
