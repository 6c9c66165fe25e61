"""`curves.png`: epochs counted from 1 as the console counts them, a loss axis that says why it
goes below 0, a legend for every line (the lr / seconds panel included)."""

import math

import numpy as np

from jaxmamba.train.writers import curves_figure, plot_curves

CLASSES = ["CSF", "grey matter", "white matter"]


def _history(n):
    rng = np.random.default_rng(0)
    out = []
    for e in range(n):
        dice = [None if e == 0 else float(v) for v in rng.uniform(0.3, 0.9, 3)]
        out.append({"epoch": e, "step": 25 * (e + 1), "train_loss": 0.5 - 0.03 * e,
                    "val_loss": 0.45 - 0.03 * e, "val_dice": dice,
                    "val_dice_mean": None if e == 0 else float(np.mean(dice)),
                    "val_dice_ema": None if e == 0 else 0.5 + 0.01 * e,
                    "lr": 1e-2 * (1 - e / n) ** 0.9, "epoch_seconds": 20.0 + rng.uniform()})
    return out


def test_curves_count_epochs_from_one_and_explain_the_axes(tmp_path):
    history = _history(40)
    fig = curves_figure(history, CLASSES)
    loss_ax, dice_ax, lr_ax = fig.axes[:3]
    for ax in (loss_ax, dice_ax, lr_ax):
        for line in ax.get_lines():
            if line.get_label().startswith("_"):  # the zero line
                continue
            assert list(line.get_xdata()) == list(range(1, 41)), line.get_label()
    assert "soft Dice" in loss_ax.get_ylabel() and "\N{MINUS SIGN}" in loss_ax.get_ylabel()
    assert "below 0" in loss_ax.get_title()
    assert min(loss_ax.get_lines()[0].get_ydata()) < 0  # this history does go below 0
    legend = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]  # the twin axes
    assert legend == ["learning rate (left)", "seconds per epoch (right)"]
    assert [t.get_text() for t in dice_ax.get_legend().get_texts()] == [
        *CLASSES, "mean (pseudo-Dice)", "EMA"]
    first_dice = dice_ax.get_lines()[0].get_ydata()[0]
    assert math.isnan(first_dice)  # no validation Dice yet: a gap, not a zero
    plot_curves(history, tmp_path / "curves.png", CLASSES)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
