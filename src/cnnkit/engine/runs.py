"""A run's folder and files, and its data loaders: runs/<task>/<name>/ with config.yaml, metrics.csv
(one row per epoch), results.png (the curves), weights/. Shared by training, validation and the report."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.device import auto_workers


def new_run_dir(project: str | Path, task: str, name: str, exist_ok: bool) -> Path:
    """runs/<task>/<name>, or <name>2, <name>3 ... when it exists (nothing of an earlier run is overwritten)."""
    base = Path(project) / task
    path = base / name
    if exist_ok:
        return path
    i = 2
    while path.exists():
        path = base / f"{name}{i}"
        i += 1
    return path


def make_loader(dataset, cfg, *, shuffle: bool, collate_fn, in_memory: bool,
                device: torch.device, batch_size: int | None = None, sampler=None) -> DataLoader:
    """A training loader (shuffle=True) drops its last partial batch when the data holds more than one
    global batch; `sampler` (its order, this process's shard) replaces the loader's own shuffling."""
    workers = auto_workers(in_memory, device) if cfg.workers < 0 else cfg.workers
    return DataLoader(dataset, batch_size=batch_size or cfg.batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      drop_last=shuffle and len(dataset) > cfg.batch_size, pin_memory=device.type == "cuda")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    ck.atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v: str):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def plot_curves(rows: list[dict[str, Any]], path: Path, fitness: str, metric_names=()) -> None:
    """Loss curves and the task's validation-metric curves, one PNG (atomic)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    loss_keys = [k for k in rows[-1] if k.startswith("train_") or k == "val_loss"]
    metric_keys = [f"val_{m}" for m in metric_names if m != "loss" and f"val_{m}" in rows[-1]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in loss_keys:
        axes[0].plot(epochs, [r.get(k) for r in rows], marker=".", label=k)
    axes[0].set(title="loss", xlabel="epoch")
    for k in metric_keys:
        axes[1].plot(epochs, [r.get(k) for r in rows], marker=".", label=k, lw=2.5 if k == f"val_{fitness}" else 1.2)
    axes[1].set(title="validation", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with ck.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
