"""Progress bars only on a terminal (log.progress: auto) unless asked: log files get no frames;
the training run's console lines."""

import io
import os
from pathlib import Path

import pytest
from tqdm import tqdm

from jaxmamba import console
from jaxmamba.config import ConfigError, load_config
from jaxmamba.console import progress_enabled


@pytest.fixture
def terminal():
    """A real terminal (the child end of a pseudo-terminal) and a reader of what it shows."""
    parent, child = os.openpty()
    stream = os.fdopen(child, "w")
    yield stream, lambda: os.read(parent, 1 << 16).decode()
    stream.close()
    os.close(parent)


def _bar(stream, setting):
    for _ in tqdm(range(50), desc="epoch 1/2", file=stream, mininterval=0,
                  disable=not progress_enabled(setting, stream)):
        pass


def test_auto_draws_bars_on_a_terminal_only(terminal, tmp_path):
    tty, shown = terminal
    _bar(tty, "auto")
    tty.flush()
    assert "epoch 1/2" in (frames := shown()) and frames.count("\r") > 10
    with open(tmp_path / "train.log", "w") as log:
        assert not progress_enabled("auto", log)
        _bar(log, "auto")
    assert (tmp_path / "train.log").read_text() == ""
    assert not progress_enabled("auto", io.StringIO())
    closed = open(tmp_path / "closed", "w")
    closed.close()
    assert not progress_enabled("auto", closed)


def test_true_and_false_are_obeyed(terminal, tmp_path):
    tty, _ = terminal
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, tty)
    with open(tmp_path / "train.log", "w") as log:
        _bar(log, True)
    assert "epoch 1/2" in (tmp_path / "train.log").read_text()


def test_log_progress_setting():
    assert load_config(None, ["data.raw_dir=x"]).log.progress == "auto"
    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(None, ["data.raw_dir=x", f"log.progress={value}"]).log.progress == want
    with pytest.raises(ConfigError, match=r"log.progress = 'sometimes'.*auto"):
        load_config(None, ["data.raw_dir=x", "log.progress=sometimes"])


def test_training_lines():
    record = {"epoch": 1, "train_loss": 0.51234, "lr": 0.00012345, "epoch_seconds": 12.34,
              "val_loss": 0.4, "val_dice": [0.81234, None], "val_dice_ema": 0.5, "best": True}
    assert console.epoch_line(record, ["liver", "tumour"], eta_seconds=3725.9) == (
        "epoch 2: train loss 0.5123, lr 0.000123, 12.3 s; val loss 0.4000, pseudo-Dice "
        "liver 0.812, tumour - (EMA 0.5000, best); run ETA 1:02:05")
    train_only = {k: record[k] for k in ("epoch", "train_loss", "lr", "epoch_seconds")}
    assert console.epoch_line(train_only, ["liver"]) == (
        "epoch 2: train loss 0.5123, lr 0.000123, 12.3 s")
    assert console.throughput_line(0.25, 2, 11) == (
        "throughput: 4.00 steps/s (250 ms per step, 8.0 patches/s) over steps 2-11")
    assert console.resumed_line(Path("r"), 3, 5, 40) == (
        "resumed r at epoch 3, 5 steps into it (step 40)")
    assert console.resumed_line(Path("r"), 3, None, 40) == "resumed r at epoch 3 (step 40)"
    assert console.compiled_line(61.25, "segmamba", (64, 64, 64), 2, 2, 2, "cpu") == (
        "compiled the train step in 61.2 s (segmamba, patch [64, 64, 64], batch 2 over 2 "
        "data-parallel device(s), 2 device(s) per sample (mesh.spatial), cpu)")
    assert console.saved_line(Path("r"), [], []) == "no epoch was saved yet"
    assert console.saved_line(Path("r"), [1, 2], [7]) == (
        "the last complete epoch (2) and the state at step 7 are saved in r; run the same "
        "command again to go on from there")
