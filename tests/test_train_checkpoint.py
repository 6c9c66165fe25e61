"""Checkpointer: latest + best, async saves, exact round trip of parameters, optimizer state
(optax NamedTuples), data-iterator state and meta; the frozen iterator snapshot; damaged and
non-finite checkpoints; strict JSON in metrics.jsonl."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import check_reference
from flax import nnx

from jaxmamba.rundir import RunDirError
from jaxmamba.train.checkpoint import Checkpointer
from jaxmamba.train.finite import all_finite, check_restored
from jaxmamba.train.optim import scale_by_torch_radam
from jaxmamba.train.writers import RunWriter


def _state():
    params = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), scale_by_torch_radam())
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    _, opt = tx.update(grads, opt, params)  # non-zero moments
    return params, {"step": jnp.array(7, jnp.int32), "opt": opt}


def test_round_trip_latest_and_best(tmp_path):
    params, train = _state()
    ckpt = Checkpointer(tmp_path)
    data_state = {"next_index": 5, "nested": [1, 2]}
    ckpt.save(1, params=params, train=train, data_state=data_state, meta={"epoch": 1},
              best=True)
    data_state["next_index"] = 9  # the live iterator moves on while the save runs
    later = jax.tree.map(lambda p: p + 1, params)
    ckpt.save(2, params=later, train=train, data_state=data_state, meta={"epoch": 2},
              best=False)
    ckpt.wait()
    assert ckpt.latest_epoch() == 2 and ckpt.latest_epoch("best") == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["2"]
    ckpt.close()

    fresh = Checkpointer(tmp_path)
    p, t, d, meta = fresh.restore(params, train)
    assert meta == {"epoch": 2} and d == {"next_index": 9, "nested": [1, 2]}
    assert jax.tree.structure(t) == jax.tree.structure(train)  # NamedTuples, not tuples
    check_reference((later, train))
    for a, b in zip(jax.tree.leaves((p, t)), jax.tree.leaves((later, train)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p_best, t_best, d_best, meta_best = fresh.restore(params, None, which="best")
    assert t_best is None and d_best is None and meta_best == {"epoch": 1}
    for a, b in zip(jax.tree.leaves(p_best), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert fresh.read_meta("best") == {"epoch": 1}
    fresh.close()


def test_snapshot_is_frozen_at_save_time(tmp_path):
    params, train = _state()
    ckpt = Checkpointer(tmp_path)
    state = {"pos": [3]}
    ckpt.save(1, params=params, train=train, data_state=state, meta={}, best=False)
    state["pos"].append(4)  # mutating the live state after save() must not leak in
    ckpt.wait()
    assert ckpt.restore(params, train)[2] == {"pos": [3]}
    ckpt.close()


def test_damaged_checkpoint_is_named_and_non_finite_state_is_found(tmp_path):
    params, train = _state()
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, params=params, train=train, data_state={}, meta={"epoch": 1}, best=False)
    ckpt.close()
    (tmp_path / "checkpoints" / "latest" / "1" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(RunDirError, match=r"latest/1: the latest checkpoint cannot be read, it "
                                          r"is damaged.*JSONDecodeError.*train.run_dir"):
        Checkpointer(tmp_path).read_meta()
    assert bool(all_finite((params, train)))
    poisoned = jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, train)
    assert not bool(all_finite((params, poisoned)))
    with pytest.raises(RunDirError, match="holds non-finite values"):
        check_restored(poisoned, tmp_path / "latest" / "1")


def test_metrics_jsonl_is_strict_json(tmp_path):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    writer = RunWriter(tmp_path, ["a", "b"], tensorboard=False, plot=False,
                       history=[{"epoch": 0, "train_loss": math.inf}])
    writer.epoch({"epoch": 1, "train_loss": 0.5, "val_dice": [math.nan, 0.25],
                  "grad_norm": np.float32("nan")})
    writer.close()
    lines = [json.loads(x, parse_constant=refuse)
             for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 0, "train_loss": None},
                     {"epoch": 1, "train_loss": 0.5, "val_dice": [None, 0.25], "grad_norm": None}]
