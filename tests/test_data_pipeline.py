"""The grain pipeline: oversampling share, determinism, resuming, orbax, workers, validation."""

import os
from pathlib import Path

import grain
import nibabel as nib
import numpy as np
import pytest
from conftest import seeded_rng, tiny_plan

from jaxmamba.data import fold_cases, preprocess_dataset, train_iterator, val_iterator
from jaxmamba.data.sampling import is_forced_foreground, patch_corner
from jaxmamba.datasets.phantom import make_phantom_dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory, request):
    root = make_phantom_dataset(tmp_path_factory.mktemp("raw") / "Phantom", n_cases=6,
                                seed=int(seeded_rng(request).integers(2**16)))
    out = tmp_path_factory.mktemp("cache")
    plan, errors = preprocess_dataset(root, out, progress=False)
    assert errors == []
    return out, plan


def _equal(a, b):
    return (np.array_equal(a["image"], b["image"]) and
            all(np.array_equal(x, y) for x, y in zip(a["target"], b["target"], strict=True)))


def test_batch_layout_and_deep_supervision(cache):
    out, plan = cache
    train, _ = fold_cases(out, 0)
    batch = next(train_iterator(out, plan, train, seed=1))
    b, p = plan.batch_size, plan.patch_size
    assert batch["image"].shape == (b, *p, 1) and batch["image"].dtype == np.float32
    assert len(batch["target"]) == plan.num_stages - 1
    for t, scale in zip(batch["target"], plan.deep_supervision_scales, strict=True):
        assert t.dtype == np.int32
        assert t.shape == (b, *(round(s * f) for s, f in zip(p, scale, strict=True)))
        assert set(np.unique(t)) <= {0, 1, 2}
    # the coarser targets are nearest-neighbour subsamples of the full-resolution one
    full, half = batch["target"][0], batch["target"][1]
    agree = [np.mean(np.isin(half[i], np.unique(full[i]))) for i in range(b)]
    assert min(agree) == 1.0


def test_oversampling_rule():
    assert [is_forced_foreground(j, 2) for j in range(2)] == [False, True]
    assert [is_forced_foreground(j, 3) for j in range(3)] == [False, False, True]
    assert sum(is_forced_foreground(j, 9) for j in range(9)) == 3
    assert not any(is_forced_foreground(j, 1) for j in range(1))


def test_foreground_share_matches_nnunet(tmp_path, rng):
    """One case with a tiny foreground: random patches almost never hit it, so the share of
    patches with foreground is ~1/3 with a batch of 3 (sample 2 forced), and forced patches are
    centred on it."""
    root = tmp_path / "raw"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    img = rng.normal(5.0, 1.0, (48, 48, 48)).astype(np.float32)
    lab = np.zeros((48, 48, 48), np.uint8)
    c = rng.integers(4, 44, 3)
    lab[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = 1
    for i in range(5):
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / f"imagesTr/case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / f"labelsTr/case{i}.nii.gz")
    (root / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": '
                                       '{"background": 0, "dot": 1}, "file_ending": ".nii.gz"}')
    plan = tiny_plan(dataset_name="dot", patch_size=(8, 8, 8), batch_size=3,
                     n_blocks_encoder=(2, 2), n_blocks_decoder=(2,),
                     labels=(("background", 0), ("dot", 1)))
    _, errors = preprocess_dataset(root, tmp_path / "cache", plan, progress=False)
    assert errors == []
    it = train_iterator(tmp_path / "cache", plan, [f"case{i}" for i in range(5)], seed=7,
                        augment=False)
    has_fg = np.array([[(t > 0).any() for t in next(it)["target"][0]] for _ in range(100)])
    assert has_fg[:, 2].all()  # the last sample of every batch is forced
    assert has_fg.mean() == pytest.approx(1 / 3, abs=0.04)
    # random patches hit 2x2x2 foreground in 48^3 with probability ~ (9/41)^3 ≈ 1 %
    assert has_fg[:, :2].mean() < 0.05


def test_patch_corner_bounds():
    rng = np.random.default_rng(0)
    corners = np.array([patch_corner((5, 30, 30), (12, 20, 20), (8, 16, 16), rng)
                        for _ in range(500)])
    # axis 0: image smaller than the patch → centred with padding both sides
    assert corners[:, 0].min() == -3 and corners[:, 0].max() == -3
    # in-plane: may reach half of (initial - final) = 2 voxels past each border
    assert corners[:, 1].min() == -2 and corners[:, 1].max() == 30 + 2 - 20


def test_resume_reproduces_batches(cache):
    out, plan = cache
    train, _ = fold_cases(out, 0)
    it = train_iterator(out, plan, train, seed=3)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = train_iterator(out, plan, train, seed=3)
    resumed.set_state(state)
    assert all(_equal(e, next(resumed)) for e in expected)
    other = train_iterator(out, plan, train, seed=4)
    other.set_state(state)
    assert not _equal(expected[0], next(other))


def test_orbax_checkpoint_of_iterator(cache, tmp_path):
    import orbax.checkpoint as ocp
    out, plan = cache
    train, _ = fold_cases(out, 1)
    it = train_iterator(out, plan, train, seed=5)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = [next(it) for _ in range(2)]
        fresh = train_iterator(out, plan, train, seed=5)
        restore = grain.checkpoint.CheckpointRestore(fresh)
        mngr.restore(1, args=ocp.args.Composite(data_iter=restore))
    assert all(_equal(e, next(fresh)) for e in expected)


def test_workers_give_the_same_batches(cache):
    out, plan = cache
    train, _ = fold_cases(out, 2)
    single = train_iterator(out, plan, train, seed=9)
    expected = [next(single) for _ in range(2)]
    multi = train_iterator(out, plan, train, seed=9, num_workers=1)
    assert all(_equal(e, next(multi)) for e in expected)


def test_validation_batches_repeat_and_are_not_augmented(cache):
    out, plan = cache
    _, val = fold_cases(out, 0)
    first = list(val_iterator(out, plan, val, num_batches=3, seed=0))
    second = list(val_iterator(out, plan, val, num_batches=3, seed=0))
    assert len(first) == 3 and all(_equal(a, b) for a, b in zip(first, second, strict=True))
    # un-augmented: the image values are a crop of the cached array (no interpolation)
    from jaxmamba.data.preprocess import load_preprocessed
    data = np.concatenate([load_preprocessed(out, v)[0].ravel() for v in val])
    values = np.unique(first[0]["image"])
    assert np.isin(values[values != 0], data).all()


def test_workers_end_when_the_training_process_is_killed(cache, tmp_path):
    """`kill -9` of the process that iterates: its grain workers end too (they used to stay)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    out, _ = cache
    code = (f"import time; from jaxmamba.data import fold_cases, load_plan, train_iterator\n"
            f"it = train_iterator({str(out)!r}, load_plan({str(out)!r}), "
            f"fold_cases({str(out)!r}, 0)[0], seed=0, num_workers=2)\n"
            f"next(it); print('ready', flush=True); time.sleep(300)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                              cwd=root)
    try:
        assert parent.stdout.readline().strip() == b"ready"
        workers = [p for p in _children(parent.pid) if p != parent.pid]
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def _children(pid: int) -> list[int]:
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = Path(f"/proc/{stat}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
