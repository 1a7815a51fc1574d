"""Detections as a COCO results file (cocodataset.org/#format-results) that other tools evaluate.

    [{"image_id": 1007, "category_id": 90, "bbox": [x, y, w, h], "score": 0.87}, ...]

The ids are the dataset's: `cnnkit.data.formats.coco_ids` gives them, the same function that numbers
the COCO file `cnnkit data convert --to coco` writes (and a COCO source keeps its own), so the file
evaluates against that ground truth as it is. Boxes are in each image's own pixels, rounded to 1e-6
px; scores keep 9 significant digits, enough to tell every float32 apart, so their order (and with it
AP) is the one cnnkit's own evaluation saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from cnnkit.errors import DataError


def label_plus_one(num_classes: int) -> list[int]:
    """The category ids of a checkpoint that does not record its dataset's: label + 1."""
    return list(range(1, num_classes + 1))


def checkpoint_category_ids(ckpt: dict, num_classes: int) -> list[int] | None:
    """The dataset category id of each class as the checkpoint recorded them (None for a checkpoint
    written before they were recorded, or one from pretrained weights)."""
    ids = (ckpt.get("preprocess") or {}).get("category_ids")
    if not isinstance(ids, (list, tuple)) or len(ids) != num_classes:
        return None
    return [int(i) for i in ids]


def result_entries(det: dict, image_id: int, category_ids: Sequence[int], *,
                   file_name: str | None = None) -> list[dict]:
    """One image's detections ({"boxes" XYXY in the image's pixels, "scores", "labels"}) as COCO results."""
    boxes = torch.as_tensor(det["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = torch.as_tensor(det["scores"]).detach().to("cpu", torch.float64).reshape(-1).tolist()
    labels = torch.as_tensor(det["labels"]).detach().to("cpu").reshape(-1).tolist()
    out = []
    for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores, labels):
        entry = {"image_id": int(image_id), "category_id": int(category_ids[int(c)]),
                 "bbox": [round(x1, 6), round(y1, 6), round(x2 - x1, 6), round(y2 - y1, 6)],
                 "score": float(f"{s:.9g}")}
        if file_name is not None:
            entry["file_name"] = file_name
        out.append(entry)
    return out


def write_results(path: str | os.PathLike, entries: list[dict]) -> Path:
    """The results list as JSON, written atomically (one entry a line, so it diffs and greps)."""
    from cnnkit.engine.checkpoint import atomic_write_text

    path = Path(path)
    text = "[\n" + ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries) + ("\n" if entries else "") + "]\n"
    atomic_write_text(path, text)
    return path


def dataset_ids_for_images(paths: Sequence[Path], data, names: Sequence[str], *,
                           on_bad_label: str = "error") -> tuple[list[int], list[int], dict]:
    """(image id of each of `paths`, category id of each class, {resolved path: (width, height)}) as
    the COCO file of dataset `data` holds them. An image is found by its path, else by its file name;
    one that is not in the dataset, or whose name several of its images share, is a DataError."""
    from cnnkit.data.detection import read_detection_splits
    from cnnkit.data.formats import coco_ids

    splits, label = read_detection_splits(data, on_bad_label=on_bad_label)
    if list(splits.names) != list(names):
        raise DataError(f"the data's classes {splits.names} differ from the checkpoint's {list(names)}",
                        path=str(data), fix="give --data the dataset the checkpoint was trained on")
    ids = coco_ids(splits)
    by_path: dict[Path, dict[int, tuple[int, int]]] = {}
    by_name: dict[str, dict[int, tuple[int, int]]] = {}
    for split, recs in splits.splits.items():
        for rec, image_id in zip(recs, ids.image_ids[split]):
            by_path.setdefault(rec.image_path.resolve(), {})[image_id] = (rec.width, rec.height)
            by_name.setdefault(rec.image_path.name, {})[image_id] = (rec.width, rec.height)
    out, sizes = [], {}
    for p in paths:
        found = by_path.get(Path(p).resolve()) or by_name.get(Path(p).name)
        if not found:
            raise DataError(f"no image of this name in {label}, so it has no image id there", path=str(p),
                            fix="predict it without --data (its image_id is then a running number), "
                                "or predict the dataset's own images")
        if len(found) > 1:
            raise DataError(f"images of several splits of {label} have this name (ids "
                            f"{', '.join(map(str, sorted(found)))})", path=str(p),
                            fix="give the image's path inside the dataset folder")
        (image_id, size), = found.items()
        out.append(image_id)
        sizes[Path(p).resolve()] = size
    return out, list(ids.category_ids), sizes
