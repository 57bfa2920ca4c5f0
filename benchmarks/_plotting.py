"""The matplotlib plumbing the learning-curve benchmarks share (learning_curves.py, learning_study.py): a
headless figure, a mean curve with its shaded band, and the save. matplotlib (the ``bench`` extra) is imported
only when a plot is drawn."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple


def figure(nrows: int, ncols: int, figsize: Tuple[float, float], **kw: Any):
    """``plt.subplots(nrows, ncols, figsize=figsize, **kw)`` on the non-interactive Agg backend (no display
    needed); returns (figure, axes) as ``plt.subplots`` does. ``figsize`` in inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, **kw)


def mean_band(ax, x: Sequence[float], mean: Sequence[float], lo: Sequence[float], hi: Sequence[float], *,
              label: str, color: Optional[str], alpha: float, **line: Any) -> None:
    """One curve on ``ax``: ``mean`` (same length as ``x``) as a line with round markers, and the band
    [``lo``, ``hi``] around it shaded at ``alpha`` in the same ``color``; ``line``: extra line keywords (e.g.
    ``lw``)."""
    ax.plot(x, mean, marker="o", ms=3, label=label, color=color, **line)
    ax.fill_between(x, lo, hi, alpha=alpha, color=color)


def save(fig, path: str, title: str = "", dpi: int = 100) -> None:
    """Writes ``fig`` to ``path`` (its folder created) at ``dpi`` dots per inch, with ``title`` above the
    panels when given, and closes it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
