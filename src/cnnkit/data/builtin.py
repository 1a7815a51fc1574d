"""Built-in datasets, usable by name.

* `fashion-mnist`: Fashion-MNIST's 10,000 test images (Xiao, Rasul & Vollgraf 2017, MIT licence),
  shipped in `cnnkit/assets/fashion-mnist/`, split per class into 8,000 train / 2,000 val (800 / 200
  per class, see `splits.stratified_split`). Works offline, loads in well under a second.
* `fashion-mnist-full`: the 60,000 train + 10,000 test images, found in the first of
  $CNNKIT_DATA/FashionMNIST/raw, ./data/FashionMNIST/raw, ~/.cache/cnnkit/FashionMNIST/raw (the
  layout torchvision's downloader writes) or /usr/share/datasets/fashion-mnist (Debian package
  dataset-fashion-mnist) that holds all four files. Never downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnnkit.data.classification_types import ClassificationData, TensorImageDataset
from cnnkit.data.idx import find_idx_files, read_idx_pair
from cnnkit.data.splits import stratified_split
from cnnkit.errors import DataError

FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
EMBEDDED_FASHION_DIR = Path(__file__).resolve().parent.parent / "assets" / "fashion-mnist"
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_NAMES = ("fashion-mnist", "fashion-mnist-full")
_ALL_FOUR = {("train", "images"), ("train", "labels"), ("t10k", "images"), ("t10k", "labels")}


def fashion_mnist_full_dirs() -> list[Path]:
    """Where `fashion-mnist-full` is looked for, in order."""
    dirs = []
    if os.environ.get("CNNKIT_DATA"):
        dirs.append(Path(os.environ["CNNKIT_DATA"]).expanduser() / "FashionMNIST" / "raw")
    dirs.append(Path("data") / "FashionMNIST" / "raw")
    dirs.append(Path("~/.cache/cnnkit").expanduser() / "FashionMNIST" / "raw")
    dirs.append(SYSTEM_FASHION_DIR)
    return dirs


def load_fashion_mnist_embedded() -> ClassificationData:
    """The embedded 10,000 images, split 8,000 / 2,000 the same way every time."""
    files = find_idx_files(EMBEDDED_FASHION_DIR)
    if not {("t10k", "images"), ("t10k", "labels")} <= files.keys():
        raise DataError("the embedded Fashion-MNIST files are missing", path=str(EMBEDDED_FASHION_DIR),
                        fix="reinstall cnnkit (the files ship as package data)")
    images, labels = read_idx_pair(files["t10k", "images"], files["t10k", "labels"])
    train_idx, val_idx = stratified_split(labels.tolist(), [str(i) for i in range(len(labels))])
    return ClassificationData(
        train=TensorImageDataset(images[train_idx], labels[train_idx]),
        val=TensorImageDataset(images[val_idx], labels[val_idx]),
        names=list(FASHION_MNIST_NAMES), channels=1, in_memory=True,
        source=f"fashion-mnist (embedded, {len(train_idx)} train / {len(val_idx)} val)")


def load_fashion_mnist_full() -> ClassificationData:
    """60,000 train / 10,000 val from the first folder of `fashion_mnist_full_dirs` holding all four files."""
    searched = fashion_mnist_full_dirs()
    for folder in searched:
        files = find_idx_files(folder)
        if _ALL_FOUR <= files.keys():
            train = read_idx_pair(files["train", "images"], files["train", "labels"])
            val = read_idx_pair(files["t10k", "images"], files["t10k", "labels"])
            return ClassificationData(
                train=TensorImageDataset(*train), val=TensorImageDataset(*val),
                names=list(FASHION_MNIST_NAMES), channels=1, in_memory=True,
                source=f"fashion-mnist-full ({folder}, {len(train[1])} train / {len(val[1])} val)")
    raise DataError(
        "Fashion-MNIST (full) not found; looked in " + ", ".join(str(d) for d in searched),
        path="fashion-mnist-full",
        fix="run `apt-get install dataset-fashion-mnist`, or put train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in "
            "$CNNKIT_DATA/FashionMNIST/raw (or ~/.cache/cnnkit/FashionMNIST/raw); "
            "the embedded subset is `fashion-mnist`")


def load_builtin(name: str) -> ClassificationData:
    if name == "fashion-mnist":
        return load_fashion_mnist_embedded()
    if name == "fashion-mnist-full":
        return load_fashion_mnist_full()
    raise DataError(f"unknown built-in dataset {name!r}", fix=f"use one of {', '.join(BUILTIN_NAMES)}")
