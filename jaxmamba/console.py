"""Progress bars only where someone watches them.

A bar redraws itself many times a second; on a terminal that is one line, in a log file it is
thousands of frames. `log.progress` (and the commands' bars) default to "auto": bars are drawn
only when the stream they go to (tqdm's: stderr) is a terminal, so `python train.py > log 2>&1`
writes plain lines. True or False forces them on or off.
"""

from __future__ import annotations

import sys
from typing import Literal, TextIO

Progress = bool | Literal["auto"]


def progress_enabled(setting: Progress = "auto", stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: `setting` when it is True or False; for "auto", whether
    `stream` (default `sys.stderr`, where tqdm writes) is a terminal."""
    if setting != "auto":
        return bool(setting)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
