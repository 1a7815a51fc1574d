"""COCO JSON detection annotations (cocodataset.org/#format-data), one file per split.

    annotations/instances_train.json    {"images": [{id, file_name, width, height}],
    annotations/instances_val.json       "annotations": [{id, image_id, category_id, bbox: [x, y, w, h]}],
    images/train/x.jpg                   "categories": [{id, name}]}

The split of a file comes from its name (instances_train2017.json -> train). Its images are looked
for, by `file_name`, in images/<name>, images/<split>, <name>, <split>, images/ and the root, in that
order (<name> is the file's stem without "instances_", e.g. train2017). Categories, whatever their
ids (COCO's own run 1..90 with gaps), become labels 0..K-1 in ascending id order, and the ids are
kept (`DetectionSplits.category_ids`). Crowd annotations (iscrowd = 1) are left out and counted in
`notes`, as ultralytics does.

The ids a COCO file of a dataset holds come from one function, `coco_ids`: the writer, and every
results file cnnkit writes for a dataset (`cnnkit val --save-json`, `cnnkit predict --data`), number
images and categories through it, so a results file always matches the ground truth that
`cnnkit data convert --to coco` writes (or the COCO source itself):
    category id of label k   the source's own id (COCO), else k + 1
    image id                 the image's own id (COCO) when every image of its split has a distinct
                             one, else its 1-based position in the split
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cnnkit.data.config import OUTSIDE_ROOT, exists, is_dir, is_file, resolve_inside
from cnnkit.data.formats.common import (DetectionFormat, register_format, CLASS_OUT_OF_RANGE, IMAGE_NOT_FOUND, MISSING_KEY, UNKNOWN_IMAGE_ID,
                                        UNREADABLE_IMAGE, DetectionRecord, DetectionSplits, Problems, check_box,
                                        check_splits, image_sizes, place_split_images, staging_dir)
from cnnkit.errors import DataError

JSON_FIX = "correct the entry (COCO: bbox is [x, y, width, height] in pixels)"


def _split_of(stem: str) -> tuple[str, str]:
    """(split, name) of a JSON file stem: instances_train2017 -> ("train", "train2017")."""
    name = stem[len("instances_"):] if stem.lower().startswith("instances_") else stem
    low = name.lower()
    for split in ("train", "val", "test"):
        if split in low:
            return split, name
    return low, name


def _load_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_bytes())
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=str(file), line=exc.lineno,
                        fix="repair the JSON (an export cut short?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", path=str(file), fix="check the file") from None
    if not isinstance(data, dict):
        raise DataError("a COCO file must hold a JSON object", path=str(file), fix="use a COCO instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else f"not a list ({type(data[key]).__name__})"
            raise DataError(f"{MISSING_KEY}: top-level key {key!r} is {what}", path=str(file),
                            fix="a COCO detection file needs 'images', 'annotations' and 'categories' lists")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _categories(data: dict, file: Path) -> tuple[list[int], list[str]]:
    ids, names = [], []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{MISSING_KEY}: categories[{i}] needs an integer 'id' and a string 'name'",
                            path=str(file), fix="give every category an id and a name")
        if cat["id"] in ids:
            raise DataError(f"{MISSING_KEY}: categories[{i}]: id {cat['id']} repeats", path=str(file),
                            fix="give every category its own id")
        ids.append(cat["id"])
        names.append(cat["name"])
    if not ids:
        raise DataError("'categories' is empty", path=str(file), fix="list the classes in 'categories'")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[i] for i in order], [names[i] for i in order]


def _image_dir(root: Path, json_file: Path, split: str, name: str, file_names: list[str]) -> Path:
    candidates = [root / "images" / name, root / "images" / split, root / name, root / split, root / "images",
                  root, json_file.parent]
    candidates = list(dict.fromkeys(candidates))
    probe = file_names[:20]
    for folder in candidates:
        if is_dir(folder) and any(is_file(folder / f) for f in probe):
            return folder
    raise DataError("cannot find the images of this file; looked in " + ", ".join(str(c) for c in candidates),
                    path=str(json_file), fix="put the images in images/<split>/ beside annotations/")


class _ImageEntry(NamedTuple):
    """One usable entry of 'images': its index in the list, id, file name and size (None if not given)."""

    index: int
    id: int
    file_name: str
    width: int | None
    height: int | None


def _image_entries(data: dict, file: Path, problems: Problems) -> tuple[list[_ImageEntry], set[int]]:
    """The well-formed entries of 'images', and the ids of every entry with a valid id."""
    entries: list[_ImageEntry] = []
    seen_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            problems.report(MISSING_KEY, f"images[{i}] is not an object", file, fix=JSON_FIX)
            continue
        for key, ok in (("id", _is_int), ("file_name", lambda v: isinstance(v, str) and v)):
            if not ok(img.get(key)):
                what = "missing" if key not in img else f"malformed ({img[key]!r})"
                problems.report(MISSING_KEY, f"images[{i}]: key {key!r} is {what}", file, fix=JSON_FIX)
                break
        else:
            if img["id"] in seen_ids:
                problems.report(MISSING_KEY, f"images[{i}]: key 'id' repeats id {img['id']}", file,
                                fix="give every image its own id")
                continue
            seen_ids.add(img["id"])
            if Path(img["file_name"]).is_absolute():
                problems.report(OUTSIDE_ROOT, f"images[{i}] (id {img['id']}): 'file_name' {img['file_name']!r} "
                                "points outside the dataset folder", file,
                                fix="give file_name relative to the images folder, without '..'")
                continue
            w, h = img.get("width"), img.get("height")
            sized = _is_int(w) and _is_int(h) and w > 0 and h > 0
            entries.append(_ImageEntry(i, img["id"], img["file_name"], w if sized else None, h if sized else None))
    return entries, seen_ids


def _image_records(entries: list[_ImageEntry], root: Path, folder: Path, file: Path,
                   problems: Problems) -> dict[int, DetectionRecord]:
    """A box-less record per entry whose image is inside `root` and readable, keyed by image id; the
    size is read from the image header where the entry gives none."""
    inside = []
    for entry in entries:
        if resolve_inside(root, folder / entry.file_name) is None:
            problems.report(OUTSIDE_ROOT, f"images[{entry.index}] (id {entry.id}): 'file_name' {entry.file_name!r} "
                            f"points outside the dataset folder {root}", file,
                            fix="give file_name relative to the images folder, without '..'")
        else:
            inside.append(entry)
    need_size = [str(folder / e.file_name) for e in inside if e.width is None]
    sizes = iter(image_sizes(need_size))
    records: dict[int, DetectionRecord] = {}
    for i, image_id, file_name, w, h in inside:
        path = folder / file_name
        if w is None:
            size, reason = next(sizes)
            if size is None:
                kind = IMAGE_NOT_FOUND if not exists(path) else UNREADABLE_IMAGE
                problems.report(kind, f"images[{i}] (id {image_id}): {file_name!r}: "
                                f"{'no such file' if kind == IMAGE_NOT_FOUND else reason}", file,
                                fix="add the image or remove its entry")
                continue
            w, h = size
        elif not is_file(path):
            problems.report(IMAGE_NOT_FOUND, f"images[{i}] (id {image_id}): {file_name!r} is not in {folder}", file,
                            fix="add the image or remove its entry")
            continue
        records[image_id] = DetectionRecord(path, w, h, [], [], image_id=image_id)
    return records


def _annotation_error(ann: dict) -> str | None:
    """What is wrong with the keys of one annotation (image_id, category_id, bbox), or None."""
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            return f"key {key!r} is missing"
        if key == "bbox" and not (isinstance(ann[key], list) and len(ann[key]) == 4
                                  and all(_is_num(v) for v in ann[key])):
            return f"key 'bbox' is {ann[key]!r}, expected [x, y, width, height]"
        if key != "bbox" and not _is_int(ann[key]):
            return f"key {key!r} is {ann[key]!r}, expected an integer"
    return None


def _annotations(data: dict, file: Path, records: dict[int, DetectionRecord], seen_ids: set[int],
                 label_of: dict[int, int], problems: Problems) -> tuple[dict[int, list], dict[int, list], int]:
    """The boxes (XYXY) and labels of the good annotations, per image id of `records`, and the number of
    crowd annotations (iscrowd=1), which are left out."""
    boxes: dict[int, list] = {k: [] for k in records}
    labels: dict[int, list] = {k: [] for k in records}
    crowd = 0
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.report(MISSING_KEY, f"annotations[{i}] is not an object", file, fix=JSON_FIX)
            continue
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
        bad = _annotation_error(ann)
        if bad:
            problems.report(MISSING_KEY, f"{where}: {bad}", file, fix=JSON_FIX)
            continue
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        image_id = ann["image_id"]
        if image_id not in seen_ids:
            problems.report(UNKNOWN_IMAGE_ID, f"{where}: key 'image_id' = {image_id} is not in 'images'", file,
                            fix="correct image_id or add the image")
            continue
        if image_id not in records:  # the image itself was bad and already reported
            continue
        if ann["category_id"] not in label_of:
            problems.report(CLASS_OUT_OF_RANGE, f"{where}: key 'category_id' = {ann['category_id']} is not in "
                            "'categories'", file, fix="correct category_id or add the category")
            continue
        rec = records[image_id]
        x, y, w, h = (float(v) for v in ann["bbox"])
        box, kind, detail = check_box(x, y, x + w, y + h, rec.width, rec.height)
        if box is None:
            problems.report(kind, f"{where}: key 'bbox' = {ann['bbox']}: {detail}", file, fix=JSON_FIX)
            continue
        boxes[image_id].append(box)
        labels[image_id].append(label_of[ann["category_id"]])
    return boxes, labels, crowd


def _read_one(file: Path, root: Path, split: str, name: str, problems: Problems, notes: list[str]
              ) -> tuple[list[int], list[str], list[DetectionRecord]]:
    """Category ids and names, and the records, of one COCO JSON file."""
    data = _load_json(file)
    cat_ids, cat_names = _categories(data, file)
    label_of = {cid: k for k, cid in enumerate(cat_ids)}
    entries, seen_ids = _image_entries(data, file, problems)
    folder = _image_dir(root, file, split, name, [e.file_name for e in entries]) if entries else root
    records = _image_records(entries, root, folder, file, problems)
    boxes, labels, crowd = _annotations(data, file, records, seen_ids, label_of, problems)
    if crowd:
        notes.append(f"{file.name}: {crowd} crowd annotations (iscrowd=1) left out")
    out = []
    for image_id, rec in records.items():
        out.append(DetectionRecord(rec.image_path, rec.width, rec.height, boxes[image_id], labels[image_id],
                                   image_id=image_id))
    return cat_ids, cat_names, out


def read_coco(src: str | os.PathLike, *, on_bad_label: str = "error") -> DetectionSplits:
    """Read a folder with annotations/*.json (or *.json), or one COCO JSON file (its split from its name)."""
    problems = Problems(on_bad_label)
    path = Path(src).expanduser()
    if path.is_file():
        files = [path]
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
    elif path.is_dir():
        root = path
        found = sorted((path / "annotations").glob("*.json")) or sorted(path.glob("*.json"))
        instances = [f for f in found if f.name.lower().startswith("instances_")]
        files = instances or found
        if not files:
            raise DataError("no COCO JSON file (annotations/*.json)", path=str(path),
                            fix="put the COCO files in annotations/, e.g. annotations/instances_train.json")
    else:
        raise DataError("no such file or folder", path=str(path), fix="check the path")
    root = root.resolve()

    splits: dict[str, list[DetectionRecord]] = {}
    names: list[str] | None = None
    ids: list[int] | None = None
    first: Path | None = None
    notes: list[str] = []
    for file in files:
        split, name = _split_of(file.stem)
        if split in splits:
            raise DataError(f"a second file for split {split!r}", path=str(file),
                            fix="keep one COCO file per split (instances_<split>.json)")
        cat_ids, cat_names, records = _read_one(file.resolve(), root, split, name, problems, notes)
        if names is None:
            names, ids, first = cat_names, cat_ids, file
        elif (cat_ids, cat_names) != (ids, names):
            raise DataError(f"'categories' differ from those of {first.name}", path=str(file),
                            fix="use the same categories (ids and names) in every split")
        splits[split] = records
    order = {"train": 0, "val": 1, "test": 2}
    splits = dict(sorted(splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))
    return DetectionSplits(names=list(names), splits=splits, problems=problems.items, notes=notes,
                           format="coco", root=path.resolve(), category_ids=list(ids))


# ---------------------------------------------------------------- ids

@dataclass
class CocoIds:
    """The ids a COCO file of a dataset holds: `category_ids[label]`, and per split `image_ids[split][i]`
    for record i of `splits.splits[split]`."""

    category_ids: list[int]
    image_ids: dict[str, list[int]]

    def category_id(self, label: int) -> int:
        return self.category_ids[int(label)]

    def by_path(self, splits: DetectionSplits) -> dict[str, dict[Path, int]]:
        """Per split, {resolved image path: image id}."""
        return {split: {Path(r.image_path).resolve(): i for r, i in zip(recs, self.image_ids[split])}
                for split, recs in splits.splits.items()}


def split_image_ids(records: list[DetectionRecord]) -> list[int]:
    """The records' own image ids when every one has a distinct id, else 1..N in order."""
    own = [r.image_id for r in records]
    if all(i is not None for i in own) and len(set(own)) == len(own):
        return [int(i) for i in own]
    return list(range(1, len(records) + 1))


def coco_ids(splits: DetectionSplits) -> CocoIds:
    """The image and category ids that `write_coco` writes for `splits` (module docstring): a COCO
    source keeps its own (gaps and all), any other source gets 1..K and 1..N per split."""
    cats = list(splits.category_ids) if splits.category_ids is not None else list(range(1, len(splits.names) + 1))
    return CocoIds(category_ids=cats, image_ids={s: split_image_ids(r) for s, r in splits.splits.items()})


# ---------------------------------------------------------------- writing

def coco_document(records: list[DetectionRecord], names: list[str], file_names: list[str],
                  image_ids: list[int], category_ids: list[int]) -> dict:
    """One split as a COCO dict with the ids `coco_ids` gives: bbox [x, y, w, h] rounded to 1e-6 px,
    area = w * h, annotation ids 1..M."""
    images, annotations = [], []
    for rec, name, image_id in zip(records, file_names, image_ids):
        images.append({"id": image_id, "file_name": name, "width": rec.width, "height": rec.height})
        for (x1, y1, x2, y2), c in zip(rec.boxes.tolist(), rec.labels.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[c],
                                "bbox": [round(x1, 6), round(y1, 6), round(w, 6), round(h, 6)],
                                "area": round(w * h, 6), "iscrowd": 0})
    return {"info": {"description": "written by cnnkit"}, "licenses": [],
            "categories": [{"id": i, "name": n, "supercategory": ""} for i, n in zip(category_ids, names)],
            "images": images, "annotations": annotations}


def write_coco_json(root: Path, splits: DetectionSplits, file_names: dict[str, list[str]]) -> None:
    """annotations/instances_<split>.json for images already at images/<split>/<file_names[split][i]>;
    `root` is a staging folder (see `staging_dir`). Ids from `coco_ids`."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ids = coco_ids(splits)
    for split, recs in splits.splits.items():
        doc = coco_document(recs, splits.names, file_names[split], ids.image_ids[split], ids.category_ids)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(doc, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")


def write_coco(splits: DetectionSplits, dst: str | os.PathLike, *, link: bool = True) -> Path:
    """Write annotations/instances_<split>.json and images/<split>/ into `dst` (new or empty),
    atomically as a whole; images are hard-linked where possible, else copied. Returns `dst`."""
    check_splits(splits)
    dst = Path(dst).expanduser()
    with staging_dir(dst) as tmp:
        file_names = place_split_images(tmp, splits, link)
        write_coco_json(tmp, splits, file_names)
    return dst


def _is_coco_folder(path: Path) -> bool:
    return bool(list((path / "annotations").glob("*.json")) + list(path.glob("*.json")))


register_format(DetectionFormat("coco", read_coco, write_coco, file_suffixes=(".json",),
                                is_dataset_folder=_is_coco_folder, priority=30,
                                looked_for="no annotations/*.json (COCO)"))
