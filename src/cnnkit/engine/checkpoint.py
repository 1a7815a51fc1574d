"""Checkpoints: one dict of tensors and plain Python values, written atomically.

`torch.load(path, weights_only=True)` reads every checkpoint cnnkit writes, so loading one never
runs code. Keys: version, task, model {name, kwargs}, names, state_dict, ema, optimizer, scheduler,
epoch, best_fitness, config, rng, metrics, preprocess (what the task needs to turn images into inputs
and outputs into results: img_size, mean, std, ...; detect: category_ids, the dataset's COCO id of
each class, absent from checkpoints of earlier versions).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.errors import WeightsError
from cnnkit.utils import atomic_path, atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Save atomically: a crash mid-write leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a cnnkit checkpoint safely (weights_only); clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError("weights file not found", path=str(path),
                           fix="give the path of a .pt file written by `cnnkit train` (runs/<task>/<name>/weights/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, code-carrying pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read this file as a checkpoint ({first[:160]})", path=str(path),
                           fix="use a checkpoint written by cnnkit or torch.save of a state_dict") from None
    if not isinstance(ckpt, dict):
        raise WeightsError("not a checkpoint dict", path=str(path))
    return ckpt


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, as plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
