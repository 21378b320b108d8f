"""Figures that explain themselves: matplotlib without a display, atomic PNG writes, and the pieces
every manifpt figure shares (a title naming method, data and headline figure; heatmaps with their
values in the cells; scatter limits that outliers cannot squash).

Functions that prepare a figure's data (:func:`row_shares`, :func:`robust_view`) are separate from
the drawing, so they can be tested on numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..formats import atomic_output

TITLE_CHARACTERS_PER_INCH = 11  # at the 10 pt title size: where a title line starts to overflow


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Lay out, write as PNG (atomically) and close ``fig``."""
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as partial:  # the caller checked its results folder up front
        fig.savefig(partial, format="png", dpi=120)
    pyplot().close(fig)


def figure_title(subject: str, details: list[str], width_inches: float) -> str:
    """``"Subject — detail, detail, …"``, folded between details (never inside one, so a headline
    such as ``accuracy 0.992`` stays on one line) to fit a figure ``width_inches`` wide."""
    limit = max(30, int(TITLE_CHARACTERS_PER_INCH * width_inches))
    lines, line = [], f"{subject} — " if details else subject
    for i, detail in enumerate(details):
        piece = detail + ("," if i < len(details) - 1 else "")
        if len(line) + len(piece) > limit and line.strip(" —"):
            lines.append(line.rstrip())
            line = ""
        line += piece + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def set_title(ax, subject: str, details: list[str]) -> None:
    """Title ``ax`` with :func:`figure_title`, folded to the axes' figure width."""
    ax.set_title(figure_title(subject, details, ax.figure.get_figwidth()), fontsize=10)


def row_shares(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (a row of zeros stays zero): per true class, the share of each
    prediction, so classes of different sizes read alike."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def annotated_heatmap(
    ax,
    values: np.ndarray,
    rows: list[str],
    columns: list[str],
    cell_text: np.ndarray,
    *,
    colorbar_label: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """``values`` as colours with ``cell_text`` written in each cell (dark on light cells, light on
    dark), every row and column labelled, and a labelled colour bar."""
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    fontsize = 8 if max(len(rows), len(columns)) <= 12 else 6
    for (i, j), text in np.ndenumerate(cell_text):
        red, green, blue, _ = image.cmap(image.norm(values[i, j]))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=fontsize)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)


@dataclass
class RobustView:
    """Points as drawn: inside ``lower``–``upper`` on both axes; ``clipped`` marks the ones that lay
    outside and were pulled onto the edge."""

    shown: np.ndarray  # (n, 2)
    clipped: np.ndarray  # (n,) bool
    lower: np.ndarray  # (2,)
    upper: np.ndarray  # (2,)


def robust_view(points: np.ndarray, keep: float = 0.98, padding: float = 0.1) -> RobustView:
    """Axis limits that the bulk of ``points`` fills: per axis, the range of the central ``keep``
    share widened by ``padding`` of itself. Where the full range is not much wider (at most 1.5×),
    every point is shown as it is; otherwise the few points beyond are clipped to the edge."""
    points = np.asarray(points, dtype=np.float64)
    tail = 100 * (1 - keep) / 2
    inner_low, inner_high = np.percentile(points, tail, axis=0), np.percentile(points, 100 - tail, axis=0)
    pad = padding * np.maximum(inner_high - inner_low, 1e-12)
    lower, upper = inner_low - pad, inner_high + pad
    full_low, full_high = points.min(axis=0), points.max(axis=0)
    fits = full_high - full_low <= 1.5 * (upper - lower)
    full_pad = 0.05 * np.maximum(full_high - full_low, 1e-12)
    lower = np.where(fits, full_low - full_pad, lower)
    upper = np.where(fits, full_high + full_pad, upper)
    clipped = ((points < lower) | (points > upper)).any(axis=1)
    return RobustView(np.clip(points, lower, upper), clipped, lower, upper)


def label_bars(ax, bars, labels: list[str], ends: list[float] | None = None, horizontal: bool = False) -> None:
    """Write each bar's label just past its end (or past ``ends``, e.g. the tip of an error bar)."""
    for i, (bar, label) in enumerate(zip(bars, labels)):
        length = bar.get_width() if horizontal else bar.get_height()
        end = length if ends is None else ends[i]
        middle = bar.get_y() + bar.get_height() / 2 if horizontal else bar.get_x() + bar.get_width() / 2
        ax.annotate(
            label,
            (end, middle) if horizontal else (middle, end),
            xytext=(3, 0) if horizontal else (0, 2),
            textcoords="offset points",
            ha="left" if horizontal else "center",
            va="center" if horizontal else "bottom",
            fontsize=8,
        )
