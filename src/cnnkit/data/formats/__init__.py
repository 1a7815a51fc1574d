"""Detection annotations: one in-memory form, read from and written to YOLO txt, COCO JSON and
Pascal VOC XML.

Inside cnnkit a box is XYXY in absolute, continuous pixel coordinates: a box that covers pixel
columns 0..9 of an image has x1 = 0, x2 = 10. Each format converts at its edge:

    YOLO txt   `class cx cy w h`, normalised by the image width W and height H
               x1 = (cx - w/2) W,  y1 = (cy - h/2) H,  x2 = (cx + w/2) W,  y2 = (cy + h/2) H
    COCO JSON  "bbox": [x, y, w, h] in pixels          x1 = x,  y1 = y,  x2 = x + w,  y2 = y + h
    VOC XML    1-based inclusive pixel indices         x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax

Every reader applies the same checks to every box (`check_box`): a box of zero or negative size is
bad; a box that leaves the image by less than `CLIP_TOLERANCE` pixels is clipped to it, one that
leaves it by more is bad. With on_bad_label="error" the first bad box or file raises a DataError
naming the file and line (txt, XML) or the annotation index and key (JSON); with "skip" it is left
out and listed in `DetectionSplits.problems` as (file, line or None, "kind: detail").
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Callable

from cnnkit.data.config import exists, expand_user
from cnnkit.data.formats.coco import CocoIds, coco_ids, read_coco, write_coco
from cnnkit.data.formats.common import (FORMATS, BOX_EMPTY, BOX_OUTSIDE, CLASS_OUT_OF_RANGE, CLIP_TOLERANCE,  # noqa: F401
                                        IMAGE_NOT_FOUND, LABEL_WITHOUT_IMAGE, MALFORMED_FILE, MALFORMED_LINE,
                                        MALFORMED_XML, MISSING_KEY, ON_BAD_LABEL, SIZE_MISMATCH, SKIP_HINT,
                                        UNKNOWN_CLASS, UNKNOWN_IMAGE_ID, UNREADABLE_IMAGE, DetectionRecord,
                                        DetectionFormat, DetectionSplits, Problems, check_box, check_class_name, check_on_bad_label,
                                        check_splits, image_sizes, place_image, place_split_images, problem_kind,
                                        register_format, staging_dir, summarize_problems, unique_names)
from cnnkit.data.formats.voc import read_voc, write_voc
from cnnkit.data.formats.yolo import read_yolo, write_yolo
from cnnkit.errors import DataError


# every format module of this package registers its format when imported: a new format is one new file
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "common":
        importlib.import_module(f"{__name__}.{_module.name}")


# ---------------------------------------------------------------- format detection

def detect_format(src: str | os.PathLike) -> str:
    """The registered format (`FORMATS`: "yolo", "coco", "voc", ...) of what `src` holds; a DataError says
    what was looked for."""
    path = expand_user(src)
    if not exists(path):
        raise DataError("no such file or folder", path=str(path), fix="check the path")
    formats = sorted(FORMATS.values(), key=lambda f: f.priority)
    if path.is_file():
        for fmt in formats:
            if path.suffix.lower() in fmt.file_suffixes:
                return fmt.name
        raise DataError("not a detection dataset: expected a folder, a data YAML or a COCO JSON file",
                        path=str(path), fix="pass the dataset folder")
    for fmt in formats:
        if fmt.is_dataset_folder is not None and fmt.is_dataset_folder(path):
            return fmt.name
    raise DataError("cannot tell the dataset format: " + ", ".join(f.looked_for for f in formats if f.looked_for),
                    path=str(path), fix="point at the dataset root, or at its data YAML or COCO JSON file")


def read_any(src: str | os.PathLike, *, on_bad_label: str = "error") -> DetectionSplits:
    """Read a dataset of any registered format, whichever `detect_format` finds."""
    return FORMATS[detect_format(src)].read(src, on_bad_label=on_bad_label)


WRITERS: dict[str, Callable[..., Path]] = {name: fmt.write for name, fmt in FORMATS.items()}  # the built-in ones

__all__ = ["CocoIds", "DetectionRecord", "DetectionSplits", "coco_ids", "Problems", "check_box", "detect_format", "read_any",
           "read_coco", "read_voc", "read_yolo", "summarize_problems", "write_coco", "write_voc", "write_yolo",
           "WRITERS", "FORMATS", "register_format", "DetectionFormat", "CLIP_TOLERANCE", "ON_BAD_LABEL"]
