"""Image folders, one subfolder per class (the layout torchvision's ImageFolder reads).

    root/train/<class>/**/*.jpg  +  root/val/<class>/...    (val may be named valid, validation, test)
    root/<class>/**/*.jpg                                   (split 80/20 per class, see stratified_split)

Class names are the subfolder names, sorted; label = index. Files are found recursively inside a
class folder and kept when their extension is .jpg/.jpeg/.png/.bmp/.webp (any case); other files and
hidden folders (.ipynb_checkpoints, ...) are ignored and counted in `notes`. A train class folder
without images is an error (a class that is never seen cannot be learned); in val an empty class
folder is allowed (noted), but train and val must have the same class folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cnnkit.data.classification_types import ClassificationData, ImageFileDataset
from cnnkit.data.images import BAD_IMAGE_FIX, DEFAULT_CACHE_BYTES, IMAGE_EXTENSIONS, decode_many, is_image_file
from cnnkit.data.splits import stratified_split
from cnnkit.errors import DataError

VAL_FOLDER_NAMES = ("val", "valid", "validation", "test")
_EXTENSIONS = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


def _list_dir(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise DataError("cannot read folder: permission denied", path=folder,
                        fix="make it readable (chmod -R a+rX) or run as its owner") from None
    except OSError as exc:
        raise DataError(f"cannot read folder: {exc.strerror or exc}", path=folder,
                        fix="check that the folder exists and is readable") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass
class SplitScan:
    """What one split folder holds: `images[c]` the image paths of class folder `classes[c]`."""

    folder: Path
    classes: list[str] = field(default_factory=list)
    images: list[list[str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loose_images: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(c) for c in self.images)


def _walk_images(folder: str, images: list[str], ignored: list[str], seen: set[str]) -> None:
    real = os.path.realpath(folder)
    if real in seen:  # a symlink loop
        return
    seen.add(real)
    for entry in _list_dir(folder):
        if _is_dir(entry):
            if entry.name.startswith("."):
                ignored.append(entry.path + os.sep)
            else:
                _walk_images(entry.path, images, ignored, seen)
        elif is_image_file(entry.name) and not entry.name.startswith("."):
            images.append(entry.path)
        else:
            ignored.append(entry.path)


def scan_split(folder: str | Path) -> SplitScan:
    """List the class folders of one split and their images."""
    scan = SplitScan(Path(folder))
    for entry in _list_dir(str(folder)):
        if _is_dir(entry):
            if entry.name.startswith("."):
                scan.ignored.append(entry.path + os.sep)
                continue
            images: list[str] = []
            _walk_images(entry.path, images, scan.ignored, set())
            scan.classes.append(entry.name)
            scan.images.append(images)
        elif is_image_file(entry.name):
            scan.loose_images.append(entry.path)
        else:
            scan.ignored.append(entry.path)
    return scan


def _check_train(scan: SplitScan) -> None:
    folder = str(scan.folder)
    if scan.num_images == 0:
        if scan.loose_images:
            raise DataError(f"{len(scan.loose_images)} images lie directly in the folder, none in class subfolders",
                            path=folder, fix=f"move each image into {folder}/<class name>/")
        raise DataError(f"no images found ({_EXTENSIONS}; {len(scan.ignored)} other files ignored)", path=folder,
                        fix=f"put images in {folder}/<class name>/, one subfolder per class")
    for name, images in zip(scan.classes, scan.images):
        if not images:
            raise DataError("class folder holds no images", path=os.path.join(folder, name),
                            fix=f"add {_EXTENSIONS} images to it or delete the folder")


def _compare_classes(train: SplitScan, val: SplitScan) -> None:
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append("only in train: " + ", ".join(only_train))
        if only_val:
            parts.append("only in val: " + ", ".join(only_val))
        raise DataError(f"class folders differ from train ({train.folder}): " + "; ".join(parts),
                        path=str(val.folder),
                        fix="give train and val the same class folders (an empty class folder in val is fine)")
    if val.num_images == 0:
        raise DataError("the validation folder holds no images", path=str(val.folder),
                        fix="put validation images in its class folders, or remove it to split train 80/20")


def class_labels(folders: list[str], names: list[str] | None,
                 names_error: Callable[..., DataError] | None, where: Path) -> tuple[list[str], dict[str, int]]:
    """(names, label of each class folder). Given names either are the folder names (their order
    sets the labels) or, for folders named 0..n-1, display names of those labels."""
    if names is None:
        return list(folders), {f: i for i, f in enumerate(folders)}
    if set(names) == set(folders):
        return list(names), {f: names.index(f) for f in folders}
    if all(f.isdigit() for f in folders) and {int(f) for f in folders} <= set(range(len(names))):
        return list(names), {f: int(f) for f in folders}
    make = names_error or (lambda message, fix=None: DataError(message, path=str(where), fix=fix))
    only_names = sorted(set(names) - set(folders))
    only_folders = sorted(set(folders) - set(names))
    raise make(f"'names' do not match the class folders of {where}: only in names: {', '.join(only_names) or '-'}; "
               f"only in folders: {', '.join(only_folders) or '-'}",
               fix="make 'names' list the folder names, or drop 'names' to use the folders")


def _ignored_note(scans: list[SplitScan]) -> list[str]:
    ignored = [p for s in scans for p in s.ignored]
    if not ignored:
        return []
    example = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
    return [f"ignored {len(ignored)} non-image file(s) or hidden folder(s) (only {_EXTENSIONS} are read): {example}"]


def load_split_folders(train_dir: str | Path, val_dir: str | Path | None, *, on_bad_image: str = "error",
                       cache_bytes: int = DEFAULT_CACHE_BYTES, names: list[str] | None = None,
                       names_error: Callable[..., DataError] | None = None,
                       label: str | None = None) -> ClassificationData:
    """Train from the class folders of `train_dir`, val from those of `val_dir`, or, when `val_dir`
    is None, a stratified 80/20 split of train."""
    train_dir = Path(train_dir)
    train = scan_split(train_dir)
    _check_train(train)
    scans = [train]
    if val_dir is not None:
        val = scan_split(Path(val_dir))
        _compare_classes(train, val)
        scans.append(val)
    names, label_of = class_labels(train.classes, names, names_error, train_dir)

    paths: list[str] = []
    labels: list[int] = []
    split_of: list[int] = []  # 0 train, 1 val
    for s, scan in enumerate(scans):
        for cls, images in zip(scan.classes, scan.images):
            paths.extend(images)
            labels.extend([label_of[cls]] * len(images))
            split_of.extend([s] * len(images))

    decoded = decode_many(paths, cache_bytes=cache_bytes)
    if decoded.bad and on_bad_image != "skip":
        path, reason = decoded.bad[0]
        more = f" ({len(decoded.bad) - 1} more bad images)" if len(decoded.bad) > 1 else ""
        raise DataError(f"cannot decode image: {reason}{more}", path=path, fix=BAD_IMAGE_FIX)
    keep = [i for i in range(len(paths)) if decoded.ok[i]]
    usable = {labels[i] for i in keep if split_of[i] == 0}
    for cls, images in zip(train.classes, train.images):
        if label_of[cls] not in usable:
            raise DataError(f"every image of this class ({len(images)}) is unreadable",
                            path=str(train_dir / cls), fix="replace the images or delete the class folder")

    if val_dir is None:
        rel = [Path(paths[i]).relative_to(train_dir).as_posix() for i in keep]
        tr, va = stratified_split([labels[i] for i in keep], rel)
        train_idx, val_idx = [keep[i] for i in tr], [keep[i] for i in va]
        if not val_idx:
            raise DataError(f"too few images to split off a validation set ({len(keep)}; a class needs 2 "
                            "images to give one to val)", path=str(train_dir),
                            fix="add images, or give a val folder (root/train/<class>, root/val/<class>)")
    else:
        train_idx = [i for i in keep if split_of[i] == 0]
        val_idx = [i for i in keep if split_of[i] == 1]

    def dataset(indices: list[int]) -> ImageFileDataset:
        if decoded.pixels is None:
            return ImageFileDataset([paths[i] for i in indices], [labels[i] for i in indices])
        return ImageFileDataset([paths[i] for i in indices], [labels[i] for i in indices], pixels=decoded.pixels,
                                offsets=decoded.offsets[indices], shapes=decoded.shapes[indices])

    notes = _ignored_note(scans)
    if val_dir is None:
        notes.append(f"no validation folder: val is a stratified 80/20 split of {train_dir}")
    else:
        empty = [c for c, images in zip(scans[1].classes, scans[1].images) if not images]
        if empty:
            notes.append(f"val has no images of class(es) {', '.join(empty)}")
    if decoded.pixels is None:
        notes.append(f"decoded size above {cache_bytes / 2**30:.1f} GiB: images are decoded when read, "
                     "not cached (a file that turns out truncated raises then)")
    how = f"train/ + {Path(val_dir).name}/" if val_dir is not None else "stratified 80/20 split"
    source = f"{label or f'image folder {train_dir}'} ({how}, {len(train_idx)} train / {len(val_idx)} val)"
    return ClassificationData(train=dataset(train_idx), val=dataset(val_idx), names=names, channels=3,
                              source=source, skipped=list(decoded.bad), notes=notes,
                              in_memory=decoded.pixels is not None)


def load_image_folder(root: str | Path, *, on_bad_image: str = "error",
                      cache_bytes: int = DEFAULT_CACHE_BYTES) -> ClassificationData:
    """`root/train` + `root/val` (or valid/validation/test) when `root/train` exists, else `root`'s
    class folders split 80/20."""
    root = Path(root)
    _list_dir(str(root))  # an unreadable root is reported as such
    train_dir = root / "train"
    if not train_dir.is_dir():
        return load_split_folders(root, None, on_bad_image=on_bad_image, cache_bytes=cache_bytes,
                                  label=f"image folder {root}")
    val_dirs = [root / n for n in VAL_FOLDER_NAMES if (root / n).is_dir()]
    val_dir = val_dirs[0] if val_dirs else None
    data = load_split_folders(train_dir, val_dir, on_bad_image=on_bad_image, cache_bytes=cache_bytes,
                              label=f"image folder {root}")
    if val_dir is not None and (root / "test").is_dir() and val_dir.name != "test":
        data.test_dir = root / "test"
        data.notes.append(f"{root / 'test'} is kept as the test set, not loaded")
    return data
