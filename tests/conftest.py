"""Shared fixtures: a small real ImageFolder dataset of drawn shapes; a small generated scenes dataset
(boxes and masks); a random seed that is printed and replayed (`CNNKIT_TEST_SEED=N`); a private cache
folder for the layout/precision probe."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

SEED_VARIABLE = "CNNKIT_TEST_SEED"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The suite measures layouts into a cache folder of its own (subprocesses inherit it), so that a
    run of the suite neither reads nor writes the user's ~/.cache/cnnkit."""
    before = os.environ.get("CNNKIT_CACHE")
    os.environ["CNNKIT_CACHE"] = str(tmp_path_factory.mktemp("cnnkit_cache"))
    yield
    if before is None:
        os.environ.pop("CNNKIT_CACHE", None)
    else:
        os.environ["CNNKIT_CACHE"] = before


@pytest.fixture
def random_seed(request) -> int:
    """A seed drawn afresh each run, or the one in $CNNKIT_TEST_SEED; printed at the start and named in
    the failure report with the command that replays it."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else time.time_ns() % 100_000
    request.node.cnnkit_seed = seed
    print(f"random seed {seed} (replay: {SEED_VARIABLE}={seed} python -m pytest '{request.node.nodeid}')")
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "cnnkit_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", f"{SEED_VARIABLE}={seed} python -m pytest '{item.nodeid}' replays it"))

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


TINY_SCENES = {"n_train": 16, "n_val": 6, "img_size": 96, "seed": 1}


@pytest.fixture(scope="module")
def tiny_scenes(request, tmp_path_factory):
    """A generated scenes dataset (`cnnkit data scenes`: YOLO labels, masks, a data YAML), one per test
    module; a module that needs another size sets its own `TINY_SCENES = {...}` (arguments of
    `generate_scenes`) in place of the default above."""
    from cnnkit.data.scenes import generate_scenes

    kwargs = getattr(request.module, "TINY_SCENES", TINY_SCENES)
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "s", **kwargs)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: the CPU is shared, and OpenMP threads that wait on each other crawl
    there (and a single thread makes the arithmetic order, hence the results, reproducible)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
