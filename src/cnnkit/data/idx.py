"""MNIST-style IDX files (LeCun's format): `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
`t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` (a '.' before 'idx' is accepted too).

An IDX file is big-endian: two zero bytes, a type byte (0x08 = uint8), the number of dimensions,
one uint32 per dimension, then the values. The header and length are checked here, so that a wrong
or truncated file is a DataError naming it; the values are then read with torchvision's
`read_image_file` / `read_label_file` (which need an uncompressed file: .gz files are
decompressed into a temporary file).
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from cnnkit.data.classification_types import ClassificationData, TensorImageDataset
from cnnkit.data.splits import stratified_split
from cnnkit.errors import DataError

IDX_PATTERN = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$", re.IGNORECASE)
_EXPECTED_DIMS = {"images": 3, "labels": 1}


def find_idx_files(folder: str | Path) -> dict[tuple[str, str], Path]:
    """{(split, kind): path} of the IDX files in `folder`, split in {train, t10k}, kind in {images,
    labels}; an uncompressed file wins over its .gz twin. Empty when the folder holds none."""
    found: dict[tuple[str, str], Path] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        match = IDX_PATTERN.match(entry.name)
        if match is None or not entry.is_file():
            continue
        key = (match.group(1).lower(), match.group(2).lower())
        if key not in found or not match.group(4):
            found[key] = Path(entry.path)
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=str(path),
                        fix="check the file's permissions") from None
    if path.name.lower().endswith(".gz"):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt or truncated gzip file ({exc})", path=str(path),
                            fix="download the file again, or gunzip it to check") from None
    return raw


def check_idx_header(data: bytes, path: Path, kind: str) -> tuple[int, ...]:
    """The dimensions of an IDX uint8 file of `kind` ('images': 3 dims, 'labels': 1), after checking
    its magic number and that its length matches them exactly."""
    ndim = _EXPECTED_DIMS[kind]
    expected_magic = 0x0800 + ndim
    fix = "use an MNIST-style IDX file (download it again if it was cut short)"
    if len(data) < 4:
        raise DataError(f"not an IDX file: only {len(data)} bytes", path=str(path), fix=fix)
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"wrong magic number 0x{magic:08x} for IDX {kind} (expected 0x{expected_magic:08x}: "
                        f"uint8, {ndim} dimension{'s' if ndim > 1 else ''})", path=str(path), fix=fix)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated IDX header: {len(data)} of {header} bytes", path=str(path), fix=fix)
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    payload = 1
    for d in dims:
        payload *= d
    if payload == 0:
        raise DataError(f"empty IDX file: dimensions {'x'.join(map(str, dims))} hold no values", path=str(path),
                        fix=fix)
    if len(data) - header != payload:
        state = "truncated" if len(data) - header < payload else "too long"
        raise DataError(f"{state} IDX file: dimensions {'x'.join(map(str, dims))} need {payload} bytes of "
                        f"values, the file holds {len(data) - header}", path=str(path), fix=fix)
    return dims


def read_idx(path: str | Path, kind: str) -> torch.Tensor:
    """An IDX file as a tensor: 'images' -> uint8 [N, H, W], 'labels' -> int64 [N]."""
    path = Path(path)
    data = _read_bytes(path)
    check_idx_header(data, path, kind)
    reader = read_image_file if kind == "images" else read_label_file
    if not path.name.lower().endswith(".gz"):
        return reader(str(path))
    with tempfile.TemporaryDirectory(prefix="cnnkit-idx-") as tmp:
        plain = os.path.join(tmp, "data.idx")
        with open(plain, "wb") as f:
            f.write(data)
        return reader(plain).clone()


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 1, H, W] and labels int64 [N] from an images file and its labels file."""
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}",
                        path=str(labels_path), fix="pair each images file with its own labels file")
    return images.unsqueeze(1).contiguous(), labels


def default_names(num_classes: int) -> list[str]:
    """'0'..'9', or '0'..str(n-1) when the labels go beyond 9."""
    return [str(i) for i in range(max(10, num_classes))]


def _require(files: dict, key: tuple[str, str], folder: Path) -> Path:
    if key not in files:
        split, kind = key
        wanted = f"{split}-{kind}-idx{_EXPECTED_DIMS[kind]}-ubyte[.gz]"
        raise DataError(f"IDX folder lacks {wanted}", path=str(folder),
                        fix=f"put {wanted} next to the other IDX files")
    return files[key]


def load_idx_folder(folder: str | Path, *, val_dir: str | Path | None = None, names: list[str] | None = None,
                    names_error: Callable[..., DataError] | None = None,
                    label: str | None = None) -> ClassificationData:
    """Train from `folder`'s train-* files, val from the t10k-* files of `val_dir` (default `folder`);
    without t10k files, train is split 80/20 per class. Names default to '0'..'9'."""
    folder = Path(folder)
    val_dir = Path(val_dir) if val_dir is not None else folder
    files = find_idx_files(folder)
    train_x, train_y = read_idx_pair(_require(files, ("train", "images"), folder),
                                     _require(files, ("train", "labels"), folder))
    val_files = files if val_dir == folder else find_idx_files(val_dir)
    if ("t10k", "images") in val_files or val_dir != folder:
        val_x, val_y = read_idx_pair(_require(val_files, ("t10k", "images"), val_dir),
                                     _require(val_files, ("t10k", "labels"), val_dir))
        how = ""
    else:
        train_idx, val_idx = stratified_split(train_y.tolist(), [str(i) for i in range(len(train_y))])
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
        how = "no t10k files: stratified 80/20 split, "
    if train_x.shape[2:] != val_x.shape[2:]:
        raise DataError(f"val images are {tuple(val_x.shape[2:])}, train images {tuple(train_x.shape[2:])}",
                        path=str(val_dir), fix="use train and t10k files of the same dataset")
    top = int(max(train_y.max(), val_y.max())) if len(train_y) and len(val_y) else 0
    if names is None:
        names = default_names(top + 1)
    elif top >= len(names):
        make = names_error or (lambda message, fix=None: DataError(message, path=str(folder), fix=fix))
        raise make(f"labels go up to {top} but only {len(names)} names are given",
                   fix=f"list {top + 1} class names")
    data = ClassificationData(
        train=TensorImageDataset(train_x, train_y), val=TensorImageDataset(val_x, val_y), names=list(names),
        channels=1, in_memory=True,
        source=f"{label or f'IDX files {folder}'} ({how}{len(train_y)} train / {len(val_y)} val)")
    return data
