"""`jaxmamba report`'s rows (`jaxmamba.infer.report.Row`) as a markdown table, CSV and a bar
plot of mean Dice beside compiled train-step memory and training time per fold."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from jaxmamba.atomic import atomic_path
from jaxmamba.infer.report import Row

GIB = 2**30


def folds_text(row: Row) -> str:
    folds = ",".join(map(str, row.folds))
    if row.source == "crossval":
        missing = f", {len(row.missing_folds)} missing" if row.missing_folds else ""
        return f"{folds} (cv{missing})"
    return folds


def _classes(rows: Sequence[Row]) -> list[str] | None:
    """The class names, when every row with a Dice has the same ones (else None)."""
    names = {tuple(r.dice) for r in rows if r.dice}
    return list(names.pop()) if len(names) == 1 else ([] if not names else None)


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _params(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _epochs(row: Row) -> str:
    if not row.epochs:
        return ""
    lo, hi = min(row.epochs), max(row.epochs)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _hours_per_fold(row: Row) -> float | None:
    return statistics.mean(row.train_seconds) / 3600 if row.train_seconds else None


def markdown(rows: Sequence[Row]) -> str:
    """The table (GitHub markdown), one row per network and dataset."""
    classes = _classes(rows)
    per_class = [f"Dice {c}" for c in classes] if classes is not None else ["Dice per class"]
    pp = any(r.pp_mean_dice is not None for r in rows)
    header = ["network", "dataset", "folds", *per_class, "mean Dice",
              *(["mean Dice (postprocessed)"] if pp else []), "parameters",
              "train-step memory (GiB)", "median step (ms)", "card", "epochs",
              "training (h per fold)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if classes is not None:
            dice = [_num(r.dice.get(c), "{:.4f}") for c in classes]
        else:
            dice = [", ".join(f"{c} {_num(v, '{:.4f}')}" for c, v in r.dice.items())]
        cells = [r.network, r.dataset, folds_text(r), *dice, _num(r.mean_dice, "{:.4f}"),
                 *([_num(r.pp_mean_dice, "{:.4f}")] if pp else []), _params(r.parameters),
                 _num(None if r.memory_bytes is None else r.memory_bytes / GIB, "{:.2f}"),
                 _num(None if r.step_seconds is None else 1000 * r.step_seconds, "{:.0f}"),
                 " / ".join(r.cards), _epochs(r), _num(_hours_per_fold(r), "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[Row]) -> str:
    """One line per row, numbers unrounded (memory in GiB, step time in ms, time in hours)."""
    classes = []
    for r in rows:
        classes += [c for c in r.dice if c not in classes]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["network", "dataset", "folds", "source", "missing_folds",
                *(f"dice_{c}" for c in classes), "mean_dice", "mean_dice_postprocessed",
                "parameters", "train_step_memory_gib", "median_step_ms", "card", "epochs",
                "train_hours_per_fold", "train_hours_total", "paths"])
    for r in rows:
        w.writerow([r.network, r.dataset, " ".join(map(str, r.folds)), r.source,
                    " ".join(map(str, r.missing_folds)), *(r.dice.get(c, "") for c in classes),
                    _blank(r.mean_dice), _blank(r.pp_mean_dice), _blank(r.parameters),
                    _blank(None if r.memory_bytes is None else r.memory_bytes / GIB),
                    _blank(None if r.step_seconds is None else 1000 * r.step_seconds),
                    " / ".join(r.cards), " ".join(map(str, r.epochs)),
                    _blank(_hours_per_fold(r)),
                    _blank(sum(r.train_seconds) / 3600 if r.train_seconds else None),
                    " ".join(r.paths)])
    return out.getvalue()


def _blank(v) -> str | float | int:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def plot(rows: Sequence[Row], path: str | Path) -> None:
    """Three bar panels per row: mean Dice (postprocessed beside it, hatched), train-step
    memory (GiB) and training time per fold (h); missing values are marked "n/a"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [f"{r.network}\n{r.dataset}\nfolds {folds_text(r)}" for r in rows]
    fig = Figure(figsize=(4 + 2.2 * len(rows), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    x = list(range(len(rows)))
    panels = [
        ("mean Dice", [r.mean_dice for r in rows], (0, 1.3)),
        ("train-step memory (GiB)",
         [None if r.memory_bytes is None else r.memory_bytes / GIB for r in rows], None),
        ("training time per fold (h)", [_hours_per_fold(r) for r in rows], None),
    ]
    for ax, (title, values, ylim) in zip(axes, panels, strict=True):
        pp = title == "mean Dice" and any(r.pp_mean_dice is not None for r in rows)
        width = 0.4 if pp else 0.7
        shift = -width / 2 if pp else 0.0
        ax.bar([i + shift for i in x], [v or 0.0 for v in values], width, color="C0",
               label="cross-validation" if pp else None)
        if pp:
            ax.bar([i + width / 2 for i in x], [r.pp_mean_dice or 0.0 for r in rows], width,
                   color="C0", alpha=0.5, hatch="//", label="postprocessed")
            ax.legend(loc="upper center", fontsize="x-small")
        for i, v in enumerate(values):
            ax.text(i + shift, 0, " n/a" if v is None else "", rotation=90, va="bottom",
                    ha="center", fontsize="small")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, names, fontsize=8)
        if ylim:  # Dice: room above 1 for the legend, ticks up to 1
            ax.set_ylim(*ylim)
            ax.set_yticks([i / 5 for i in range(6)])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
