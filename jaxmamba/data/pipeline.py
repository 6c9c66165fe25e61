"""The grain pipeline: random patches → augmentation → deep-supervision targets → batches.

`train_iterator` is infinite and deterministic from its seed (grain derives each sample's
generator from the seed and the sample index, so worker count does not change the batches); its
state (`get_state`/`set_state`, or orbax through `grain.checkpoint.CheckpointSave/Restore`)
resumes the exact batch sequence. `val_iterator` yields the same finite list of un-augmented
patches every time (nnU-Net's online pseudo-Dice batches).

Batches are dicts of numpy arrays, channels-last, the batch axis first so they shard over a
`data` mesh axis: `{"image": (B, S0, S1, S2, C) float32, "target": tuple of (B, s0, s1, s2)
int32, one per deep-supervision scale of the plan, full resolution first}`.

Multiprocess workers (`num_workers > 0`) need `if __name__ == "__main__":` in the main script
(workers re-import it); `absl.flags.FLAGS.mark_as_parsed()` is called here (grain 0.2.18 bug).
Workers ignore SIGINT and SIGTERM (the training process handles them and closes its workers) and
end when the training process ends, even by `kill -9`.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from scipy import ndimage

from jaxmamba.atomic import process_alive
from jaxmamba.data.augment import AugmentConfig, augment, finalize
from jaxmamba.data.io import DataError
from jaxmamba.data.preprocess import load_preprocessed
from jaxmamba.data.sampling import OVERSAMPLE_FOREGROUND, is_forced_foreground, sample_patch
from jaxmamba.plans import Plan


def deep_supervision_targets(seg: np.ndarray, scales: Sequence[Sequence[float]]
                             ) -> tuple[np.ndarray, ...]:
    """Nearest-neighbour downsampled label maps `(S0, S1, S2)` int32, one per scale
    (nnU-Net's `DownsampleSegForDSTransform2`, order 0, pixel centres aligned)."""
    out = []
    for scale in scales:
        shape = [int(round(s * f)) for s, f in zip(seg.shape, scale, strict=True)]
        if list(shape) == list(seg.shape):
            out.append(seg.astype(np.int32))
        else:
            factors = [n / s for n, s in zip(shape, seg.shape, strict=True)]
            out.append(ndimage.zoom(seg.astype(np.int32), factors, order=0, mode="nearest",
                                    grid_mode=True))
    return tuple(out)


class PatchSampler(grain.transforms.RandomMap):
    """Maps a position in the batch to one training sample (see the module docstring)."""

    def __init__(self, cache: str | Path, case_ids: Sequence[str], plan: Plan, batch_size: int,
                 augment_config: AugmentConfig | None, oversample: float = OVERSAMPLE_FOREGROUND):
        if not case_ids:
            raise ValueError(f"{cache}: no cases to sample from")
        self.cache, self.case_ids = str(cache), list(case_ids)
        self.batch_size, self.oversample = batch_size, oversample
        self.augment_config = augment_config
        self.final_patch = tuple(plan.patch_size)
        self.patch = (augment_config.initial_patch_size() if augment_config else self.final_patch)
        self.mask_channels = tuple(plan.use_mask_for_norm)
        self.scales = plan.deep_supervision_scales
        self._open: dict[str, tuple] = {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # memory maps are reopened in each worker

    def _case(self, case_id: str):
        if case_id not in self._open:
            arrays = load_preprocessed(self.cache, case_id)
            if arrays[0].shape[0] != len(self.mask_channels):
                raise DataError(f"{self.cache}: case {case_id} has {arrays[0].shape[0]} "
                                f"channel(s), the plan {len(self.mask_channels)}; preprocess "
                                f"again with this plan")
            self._open[case_id] = arrays
        return self._open[case_id]

    def random_map(self, position: int, rng: np.random.Generator) -> dict:
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        data, seg, fg = self._case(case_id)
        force = is_forced_foreground(int(position), self.batch_size, self.oversample)
        x, y = sample_patch(data, seg, fg, self.patch, self.final_patch, rng, force)
        if self.augment_config is not None:
            x, y = augment(x, y, rng, self.augment_config)
        else:
            x, y = finalize(x, y, self.mask_channels)
        return {"image": np.ascontiguousarray(np.moveaxis(x, 0, -1), dtype=np.float32),
                "target": deep_supervision_targets(y, self.scales)}


def _seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


def _share(ds: grain.MapDataset, batch_size: int, shard_index: int, shard_count: int
           ) -> grain.MapDataset:
    """Batches of this process's share of each global batch of `ds` (one sample per element):
    global batch `k` is elements `k·B .. k·B + B-1`; process `p` of `n` gets `B/n` consecutive
    ones from `k·B + p·B/n`. Each sample's random draws depend on its global index only (grain
    seeds a random map per element index), so the global stream does not change with `n`."""
    if batch_size % shard_count:
        raise ValueError(f"batch size {batch_size} is not divisible by the {shard_count} "
                         f"processes")
    local = ds.batch(batch_size // shard_count, drop_remainder=True)
    return local[shard_index::shard_count] if shard_count > 1 else local


def _worker_init(index: int, count: int, *, main: int) -> None:
    """grain's `worker_init_fn`: see the module docstring. `main` is the pid of the process that
    iterates; a worker ends when it is gone or when the worker's parent changes (a dead parent's
    children are adopted by another): on Python 3.12 a worker's parent need not be `main`."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    parent = os.getppid()

    def end_with_parent() -> None:
        while os.getppid() == parent and process_alive(main):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=end_with_parent, daemon=True, name="end-with-parent").start()


def _to_iterator(ds: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
    # A few batches of read-ahead: grain's default (500 elements, 16 threads) would compute
    # hundreds of augmented batches nobody asked for yet. Workers parallelise across processes.
    read = grain.ReadOptions(num_threads=1 if num_workers else 2, prefetch_buffer_size=2)
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=functools.partial(_worker_init,
                                                                   main=os.getpid()))
    return iter(it_ds)


def train_dataset(cache: str | Path, plan: Plan, case_ids: Sequence[str], *, seed: int,
                  batch_size: int | None = None, augment: bool | AugmentConfig = True,
                  oversample: float = OVERSAMPLE_FOREGROUND, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
    """The infinite training `MapDataset` of batches (before iteration / workers)."""
    batch_size = batch_size or plan.batch_size
    cfg = augment if isinstance(augment, AugmentConfig) else (
        AugmentConfig.for_plan(plan) if augment else None)
    sampler = PatchSampler(cache, case_ids, plan, batch_size, cfg, oversample)
    ds = grain.MapDataset.range(batch_size).repeat().seed(_seed(seed)).random_map(sampler)
    return _share(ds, batch_size, shard_index, shard_count)


def train_iterator(cache: str | Path, plan: Plan, case_ids: Sequence[str], *, seed: int,
                   batch_size: int | None = None, num_workers: int = 0,
                   augment: bool | AugmentConfig = True, oversample: float = OVERSAMPLE_FOREGROUND,
                   shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of training batches. Stable API.

    `batch_size` is the global batch (default: the plan's); foreground oversampling is decided
    on it. On several hosts pass `shard_index=jax.process_index()` and
    `shard_count=jax.process_count()`: each process then yields its `batch_size / shard_count`
    samples of every global batch, and the global stream is the same for any process count.
    """
    ds = train_dataset(cache, plan, case_ids, seed=seed, batch_size=batch_size, augment=augment,
                       oversample=oversample, shard_index=shard_index, shard_count=shard_count)
    return _to_iterator(ds, num_workers)


def val_iterator(cache: str | Path, plan: Plan, case_ids: Sequence[str], *, num_batches: int = 50,
                 seed: int = 0, batch_size: int | None = None, num_workers: int = 0,
                 shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """`num_batches` un-augmented global batches (with foreground oversampling), the same on every
    call; `shard_*` as for `train_iterator`. Stable API."""
    batch_size = batch_size or plan.batch_size
    sampler = PatchSampler(cache, case_ids, plan, batch_size, None)
    ds = (grain.MapDataset.range(batch_size).repeat(num_batches, reseed_each_epoch=True)
          .seed(seed).random_map(sampler))
    return _to_iterator(_share(ds, batch_size, shard_index, shard_count), num_workers)
