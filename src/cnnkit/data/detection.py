"""Detection data: one call turns a spec (built-in `scenes`, data YAML, YOLO / COCO / VOC folder)
into train and val datasets of (image, target).

    data = load_detection_data("scenes")                        # generated once, then cached
    data = load_detection_data("coco8/data.yaml", on_bad_label="skip")
    image, target = data.train[0]
    # image: tv_tensors.Image uint8 [3, H, W]
    # target: {"boxes": tv_tensors.BoundingBoxes XYXY float32 [N, 4], canvas_size=(H, W),
    #          "labels": int64 [N], "image_id": int (its id in the COCO file `cnnkit data convert` writes)}

`transform(image, target)` (torchvision transforms.v2 style) is applied in `__getitem__`, so box-aware
augmentation moves the boxes with the pixels. A source without a val split is split by the SHA-1
rank of each image's path relative to the root (20 % val, the same on every machine).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cnnkit.data.formats import (SIZE_MISMATCH, UNREADABLE_IMAGE, CocoIds, DetectionRecord, DetectionSplits, Problems,
                                 check_on_bad_label, coco_ids, read_any, read_yolo)
from cnnkit.data.images import BAD_IMAGE_FIX, DEFAULT_CACHE_BYTES, decode_image, decode_many
from cnnkit.data.splits import VAL_FRACTION, split_rank_key
from cnnkit.errors import DataError, ShapeError

BUILTIN_DETECTION = ("scenes",)


class DetectionDataset(Dataset):
    """Images and boxes of one split. `records[i]` holds image i's path, size, boxes and labels.

    When `pixels` is given, image i is `pixels[offsets[i] : offsets[i] + 3*h*w].view(3, h, w)` (all
    decoded once, see `decode_many`); else each image is decoded in `__getitem__`.
    """

    def __init__(self, records: Sequence[DetectionRecord], *, pixels: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, transform: Callable | None = None,
                 coco_image_ids: Sequence[int] | None = None, split: str | None = None):
        self.records = list(records)
        self.pixels, self.offsets = pixels, offsets
        self.transform = transform
        # image i's id in the COCO file of its split (`cnnkit.data.formats.coco_ids`), when known
        self.coco_image_ids = list(coco_image_ids) if coco_image_ids is not None else None
        self.split = split  # that split's name ("train" for images held out of it for validation)

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def __len__(self) -> int:
        return len(self.records)

    def image_id(self, index: int) -> int:
        if self.coco_image_ids is not None:
            return self.coco_image_ids[index]
        rec = self.records[index]
        return rec.image_id if rec.image_id is not None else index

    def __getitem__(self, index: int):
        rec = self.records[index]
        h, w = rec.height, rec.width
        if self.pixels is None:
            pixels = decode_image(rec.image_path)
            if tuple(pixels.shape[1:]) != (h, w):
                raise DataError(f"{SIZE_MISMATCH}: decoded {pixels.shape[2]}x{pixels.shape[1]}, labels say {w}x{h}",
                                path=str(rec.image_path), fix="correct the width/height in the annotation")
        else:
            start = int(self.offsets[index])
            pixels = self.pixels[start:start + 3 * h * w].view(3, h, w).clone()
        image = tv_tensors.Image(pixels)
        target = {"boxes": tv_tensors.BoundingBoxes(rec.boxes.to(torch.float32), format="XYXY", canvas_size=(h, w)),
                  "labels": rec.labels.clone(), "image_id": self.image_id(index)}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def detection_collate(batch):
    """(images uint8 [B, 3, H, W] stacked, list of B targets); every image must have the same size."""
    images = [item[0] for item in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ShapeError(f"a batch holds images of different sizes {sorted(shapes)}",
                         fix="resize every image to one size in the transform (e.g. --img-size)")
    return torch.stack([im.as_subclass(torch.Tensor) for im in images]), [item[1] for item in batch]


@dataclass
class DetectionData:
    """Train and val detection datasets and what a detector needs to know about them.

    `names[label]` is the class name; `source` describes the data in a line; `problems` lists
    (file, line or None, reason) of what on_bad_label="skip" left out; `notes` holds remarks worth
    printing; `in_memory` tells whether every image is already decoded; `splits` is the source as read.
    """

    train: DetectionDataset
    val: DetectionDataset
    names: list[str]
    source: str
    problems: list[tuple[str, int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    in_memory: bool = True
    splits: DetectionSplits | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def coco_ids(self) -> CocoIds:
        """The ids `cnnkit data convert --to coco` writes for this data (`cnnkit.data.formats.coco_ids`);
        `train.coco_image_ids` and `val.coco_image_ids` hold those of their images."""
        return coco_ids(self.splits)


def _split_val(records: list[DetectionRecord], root: Path | None) -> tuple[list, list]:
    base = root if root is not None and root.is_dir() else (root.parent if root is not None else None)

    def key(rec: DetectionRecord) -> str:
        try:
            return rec.image_path.resolve().relative_to(base).as_posix() if base else rec.image_path.name
        except ValueError:
            return rec.image_path.as_posix()
    n_val = int(len(records) * VAL_FRACTION + 0.5) if len(records) > 1 else 0
    ranked = sorted(range(len(records)), key=lambda i: split_rank_key(key(records[i])))
    val = set(ranked[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def _decode(records: list[DetectionRecord], problems: Problems, budget: int):
    """(kept records, pixels, offsets) with every image decoded, or (records, None, None) over budget."""
    if sum(3 * r.width * r.height for r in records) > budget:
        return records, None, None
    decoded = decode_many([str(r.image_path) for r in records], cache_bytes=budget)
    if decoded.pixels is None:
        return records, None, None
    bad = dict(decoded.bad)
    keep = []
    for i, rec in enumerate(records):
        if not decoded.ok[i]:
            problems.report(UNREADABLE_IMAGE, bad[str(rec.image_path)], rec.image_path, fix=BAD_IMAGE_FIX)
            continue
        h, w = (int(v) for v in decoded.shapes[i])
        if (h, w) != (rec.height, rec.width):
            problems.report(SIZE_MISMATCH, f"decoded {w}x{h}, labels say {rec.width}x{rec.height}", rec.image_path,
                            fix="correct the width/height in the annotation")
            continue
        keep.append(i)
    if len(keep) == len(records):
        return records, decoded.pixels, decoded.offsets
    idx = torch.as_tensor(keep, dtype=torch.int64)
    return [records[i] for i in keep], decoded.pixels, decoded.offsets[idx]


def read_detection_splits(spec: str | os.PathLike, *, on_bad_label: str = "error") -> tuple[DetectionSplits, str]:
    """(the dataset as read, a label for it) of a spec `load_detection_data` takes; no image is decoded."""
    text = os.fspath(spec)
    if text in BUILTIN_DETECTION:
        from cnnkit.data.scenes import ensure_scenes
        root = ensure_scenes()
        return read_yolo(root / "data.yaml", on_bad_label=on_bad_label), f"scenes (generated, {root})"
    from cnnkit.data.config import exists, expand_user

    path = expand_user(text)
    if not exists(path):
        close = difflib.get_close_matches(text, BUILTIN_DETECTION, n=1)
        raise DataError("dataset not found: no such file or folder", path=text,
                        fix=f"did you mean {close[0]}?" if close else
                        "give a data YAML, a YOLO / COCO / VOC folder, or the built-in name 'scenes'")
    splits = read_any(path, on_bad_label=on_bad_label)
    return splits, f"{path} ({splits.format})"


def load_detection_data(spec: str | os.PathLike, *, on_bad_label: str = "error",
                        cache_bytes: int | None = None) -> DetectionData:
    """Load a detection dataset.

    `spec`: the built-in name `scenes` (generated on first use, see `cnnkit.data.scenes`), a data
    YAML, a COCO JSON file, or a YOLO / COCO / VOC dataset folder (format detected). `on_bad_label`:
    "error" raises DataError (file and line) at the first bad label, box or image; "skip" leaves it
    out and lists it in `problems`. `cache_bytes`: when all decoded images total at most this
    (default 2 GiB) they are decoded once at load time, else in `__getitem__`.
    """
    check_on_bad_label(on_bad_label)
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    text = os.fspath(spec)
    splits, label = read_detection_splits(spec, on_bad_label=on_bad_label)

    problems = Problems(on_bad_label)
    problems.items = list(splits.problems)
    notes = list(splits.notes)
    if "train" not in splits.splits or not splits.splits["train"]:
        raise DataError("no training images", path=str(splits.root or text),
                        fix="name a train split with images (YOLO: train: images/train)")
    train = splits.splits["train"]
    val = splits.splits.get("val")
    val_split = "val"
    if val is None:
        val_split = "train"
        train, val = _split_val(train, splits.root)
        notes.append(f"no val split: {len(val)} of the train images held out (by SHA-1 of their paths)")
    elif not val:
        raise DataError("the val split has no images", path=str(splits.root or text),
                        fix="put images in the val split, or leave it out to split train 80/20")

    ids = coco_ids(splits)
    id_of = {id(rec): i for split, recs in splits.splits.items() for rec, i in zip(recs, ids.image_ids[split])}
    datasets = []
    in_memory = True
    for records, split in ((train, "train"), (val, val_split)):
        records, pixels, offsets = _decode(records, problems, budget)
        budget -= int(pixels.numel()) if pixels is not None else 0
        in_memory = in_memory and pixels is not None
        datasets.append(DetectionDataset(records, pixels=pixels, offsets=offsets,
                                         coco_image_ids=[id_of[id(r)] for r in records], split=split))
    tr, va = datasets
    boxes = sum(len(r.labels) for r in tr.records), sum(len(r.labels) for r in va.records)
    source = (f"{label}: {len(tr)} train / {len(va)} val images, {boxes[0]} / {boxes[1]} boxes, "
              f"{len(splits.names)} classes")
    return DetectionData(train=tr, val=va, names=list(splits.names), source=source, problems=problems.items,
                         notes=notes, in_memory=in_memory, splits=splits)
