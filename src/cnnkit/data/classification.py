"""Classification data: one call turns a spec (built-in name, folder, data YAML, IDX folder) into
train and val datasets of (uint8 image [C, H, W], int label).

    data = load_classification_data("fashion-mnist")          # embedded 8,000 / 2,000 images
    data = load_classification_data("path/to/images")         # <root>/<class>/*.jpg or train/ + val/
    data = load_classification_data("data.yaml", on_bad_image="skip")

When a source has no validation part, it is split per class: each class's items are ranked by the
SHA-1 of a stable key (the file path relative to the root, or the item's index in an IDX file) and
the first round(0.2 n) go to val. The split is the same on every machine and run, keeps class
proportions, and adding one file moves at most one other file between train and val.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from cnnkit.data.images import DEFAULT_CACHE_BYTES, decode_image
from cnnkit.errors import DataError, UsageError

VAL_FRACTION = 0.2
SPLIT_SALT = "cnnkit-split-v1"
ON_BAD_IMAGE = ("error", "skip")


class TensorImageDataset(Dataset):
    """Images already in memory: `images` uint8 [N, C, H, W], `labels` int64 [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index].clone()  # a clone: a transform can never alter the dataset
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class ImageFileDataset(Dataset):
    """Image files, 3-channel uint8 [3, H, W] each, either decoded once into one flat buffer
    (`pixels`, `offsets`, `shapes`, see `decode_many`) or decoded from `paths` in `__getitem__`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], *, pixels: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, shapes: torch.Tensor | None = None,
                 transform: Callable | None = None):
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.pixels, self.offsets, self.shapes = pixels, offsets, shapes
        self.transform = transform

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.pixels is None:
            image = decode_image(self.paths[index])
        else:
            h, w = (int(v) for v in self.shapes[index])
            start = int(self.offsets[index])
            image = self.pixels[start:start + 3 * h * w].view(3, h, w).clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


@dataclass
class ClassificationData:
    """Train and val datasets with what a classifier needs to know about them.

    `names[label]` is the class name; `channels` is 1 for grey sources (IDX), 3 otherwise; `source`
    describes the data in a line; `skipped` lists (path, reason) of images left out with
    on_bad_image="skip"; `notes` holds remarks worth printing (ignored files, how val was made);
    `in_memory` tells whether every image is already decoded; `test_dir` is a test folder that the
    source names but that is not loaded.
    """

    train: Dataset
    val: Dataset
    names: list[str]
    channels: int
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    in_memory: bool = True
    test_dir: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)


def split_rank_key(key: str) -> bytes:
    return hashlib.sha1(f"{SPLIT_SALT}:{key}".encode()).digest()


def stratified_split(labels: Sequence[int], keys: Sequence[str],
                     val_fraction: float = VAL_FRACTION) -> tuple[list[int], list[int]]:
    """Indices (train, val), each ascending: per class, the round(val_fraction * n) items whose keys
    hash lowest go to val (a class with one item keeps it in train)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    val: list[int] = []
    for members in by_class.values():
        n_val = int(len(members) * val_fraction + 0.5) if len(members) > 1 else 0
        ranked = sorted(members, key=lambda i: split_rank_key(keys[i]))
        val.extend(ranked[:n_val])
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def load_classification_data(spec: str | os.PathLike, *, on_bad_image: str = "error",
                             cache_bytes: int | None = None) -> ClassificationData:
    """Load a classification dataset.

    `spec`: a built-in name (`fashion-mnist`, `fashion-mnist-full`), an image folder, a data YAML
    (ultralytics style: path, train, val, names) or a folder of MNIST-style IDX files.
    `on_bad_image`: "error" raises DataError at the first unreadable image, "skip" leaves such
    images out and lists them in `skipped`. `cache_bytes`: image folders whose decoded size is at
    most this (default 2 GiB) are decoded once at load time, larger ones in `__getitem__`.
    """
    from cnnkit.data import builtin, config, idx, imagefolder

    if on_bad_image not in ON_BAD_IMAGE:
        raise UsageError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}",
                         fix="use on_bad_image='error' or 'skip'")
    cache = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    text = os.fspath(spec)
    if text in builtin.BUILTIN_NAMES:
        return builtin.load_builtin(text)
    from cnnkit.data.config import exists, expand_user

    path = expand_user(text)
    if not exists(path):
        close = difflib.get_close_matches(text, builtin.BUILTIN_NAMES, n=1)
        hint = (f"did you mean {close[0]}?" if close else
                f"give an existing folder or data YAML, or a built-in name ({', '.join(builtin.BUILTIN_NAMES)})")
        raise DataError("dataset not found: no such file or folder", path=text, fix=hint)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return _load_from_yaml(config.read_data_yaml(path), on_bad_image=on_bad_image, cache_bytes=cache)
        raise DataError("not a dataset: expected a folder or a .yaml file", path=text,
                        fix="pass the image folder, the IDX folder or the data YAML")
    if idx.find_idx_files(path):
        return idx.load_idx_folder(path)
    return imagefolder.load_image_folder(path, on_bad_image=on_bad_image, cache_bytes=cache)


def _load_from_yaml(cfg, *, on_bad_image: str, cache_bytes: int) -> ClassificationData:
    from cnnkit.data import idx, imagefolder

    train_dir = cfg.train if cfg.train is not None else cfg.root
    if idx.find_idx_files(train_dir):
        val_dir = cfg.val if cfg.val is not None else train_dir
        data = idx.load_idx_folder(train_dir, val_dir=val_dir, names=cfg.names,
                                   names_error=cfg.error_at("names"))
    elif cfg.train is None:
        raise cfg.error_at(None)("no 'train' folder given",
                               fix="add 'train: <folder>' (relative to 'path') with one subfolder per class")
    else:
        data = imagefolder.load_split_folders(cfg.train, cfg.val, on_bad_image=on_bad_image,
                                              cache_bytes=cache_bytes, names=cfg.names,
                                              names_error=cfg.error_at("names"))
    data.source = f"{cfg.file.name}: {data.source}"
    if cfg.test is not None:
        data.test_dir = cfg.test
    return data
