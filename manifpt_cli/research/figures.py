"""Matplotlib without a display, and atomic PNG writes, for every figure manifpt draws."""

from __future__ import annotations

import os

from ..formats import atomic_output


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
