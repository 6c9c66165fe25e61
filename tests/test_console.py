"""Progress bars only on a terminal (log.progress: auto) unless asked: log files get no frames."""

import io
import os

import pytest
from tqdm import tqdm

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
