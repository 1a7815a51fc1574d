"""Shared fixtures: a small real ImageFolder dataset of drawn shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("circle", "square", "stripes", "dots")


def _draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    img = rng.integers(0, 40, size=(32, 32, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:32, :32]
    cx, cy = rng.integers(12, 20, size=2)
    if kind == "circle":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 220
    elif kind == "square":
        img[cy - 7:cy + 7, cx - 7:cx + 7] = 220
    elif kind == "stripes":
        img[(xx // 3) % 2 == 0] = 200
    else:
        img[(yy % 6 == 0) & (xx % 6 == 0)] = 255
    return img


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """A real ImageFolder dataset: train/ and val/ with four classes of drawn PNGs."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_draw(c, rng)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: the CPU is shared, and OpenMP threads that wait on each other crawl
    there (and a single thread makes the arithmetic order, hence the results, reproducible)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
