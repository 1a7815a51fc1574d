"""Pictures shared by the tasks and the report: confusion matrices and annotated image grids (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnkit.utils import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    cm = np.asarray(cm, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, path)


def plot_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, colors=None,
              cols: int = 8) -> Path:
    """Images (HxW or HxWx3 uint8) in a grid, a caption under each."""
    n = len(images)
    cols = min(cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = axes.flat[i]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(cap, fontsize=7, color=(colors[i] if colors else "black"))
    fig.tight_layout()
    return _save(fig, path)
