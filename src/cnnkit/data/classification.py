"""Classification data: one call turns a spec (built-in name, folder, data YAML, IDX folder) into
train and val datasets of (uint8 image [C, H, W], int label).

    data = load_classification_data("fashion-mnist")          # embedded 8,000 / 2,000 images
    data = load_classification_data("path/to/images")         # <root>/<class>/*.jpg or train/ + val/
    data = load_classification_data("data.yaml", on_bad_image="skip")

When a source has no validation part, it is split per class (`cnnkit.data.splits.stratified_split`):
each class's items are ranked by the SHA-1 of a stable key (the file path relative to the root, or the
item's index in an IDX file) and the first round(0.2 n) go to val. The split is the same on every
machine and run, keeps class proportions, and adding one file moves at most one other file between
train and val.

This module only chooses the reader; the datasets it returns are defined in
`cnnkit.data.classification_types` (re-exported here), below the readers.
"""

from __future__ import annotations

import difflib
import os

from cnnkit.data.classification_types import ClassificationData, ImageFileDataset, TensorImageDataset
from cnnkit.data.images import DEFAULT_CACHE_BYTES
from cnnkit.data.splits import SPLIT_SALT, VAL_FRACTION, split_rank_key, stratified_split
from cnnkit.errors import DataError, UsageError

__all__ = ["ClassificationData", "ImageFileDataset", "ON_BAD_IMAGE", "SPLIT_SALT", "TensorImageDataset",
           "VAL_FRACTION", "load_classification_data", "split_rank_key", "stratified_split"]

ON_BAD_IMAGE = ("error", "skip")


def load_classification_data(spec: str | os.PathLike, *, on_bad_image: str = "error",
                             cache_bytes: int | None = None) -> ClassificationData:
    """Load a classification dataset.

    `spec`: a built-in name (`fashion-mnist`, `fashion-mnist-full`), an image folder, a data YAML
    (ultralytics style: path, train, val, names) or a folder of MNIST-style IDX files.
    `on_bad_image`: "error" raises DataError at the first unreadable image, "skip" leaves such
    images out and lists them in `skipped`. `cache_bytes`: image folders whose decoded size is at
    most this (default 2 GiB) are decoded once at load time, larger ones in `__getitem__`.
    """
    # The readers are imported here, not at the top, so that `import cnnkit.data` stays light (the IDX
    # reader pulls in torchvision); they import only the modules below this one.
    from cnnkit.data import builtin, config, idx, imagefolder

    if on_bad_image not in ON_BAD_IMAGE:
        raise UsageError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}",
                         fix="use on_bad_image='error' or 'skip'")
    cache = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    text = os.fspath(spec)
    if text in builtin.BUILTIN_NAMES:
        return builtin.load_builtin(text)
    path = config.expand_user(text)
    if not config.exists(path):
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
