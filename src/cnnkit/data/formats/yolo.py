"""YOLO txt labels in the ultralytics layout.

    data.yaml                 path (optional: default this file's folder), train, val, test, names
    images/train/x.jpg        train / val / test: a folder, a list of folders, or a .txt list of images
    labels/train/x.txt        one line per box: `class cx cy w h`, all four normalised to 0..1

Predictions (`cnnkit predict` writes labels/x.txt, ultralytics' save_conf does the same) add a
confidence: `class cx cy w h score`; `read_yolo(..., with_scores=True)` reads such files (and only
such lines), keeping the scores in `DetectionRecord.scores`, and keeps a predicted box of zero width or
height (as the model output it). Training data never takes a sixth field, nor an empty box.

An image's label file is its path with the last `images` folder replaced by `labels` and the
extension by `.txt` (as ultralytics does); an image without one is a background image. A line of
`class x1 y1 x2 y2 x3 y3 ...` (a segmentation polygon, normalised) counts as the polygon's box.
Without a YAML, a folder with images/<split>/ and labels/<split>/ is read with the class names of
classes.txt (one per line). Writing leaves `path` out of data.yaml, so the folder can move.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnnkit.data import config
from cnnkit.data.formats.common import (DetectionFormat, register_format, BOX_EMPTY, CLASS_OUT_OF_RANGE, IMAGE_NOT_FOUND, LABEL_WITHOUT_IMAGE,
                                        MALFORMED_FILE, MALFORMED_LINE, UNREADABLE_IMAGE, DetectionRecord,
                                        DetectionSplits, Problems, check_box, check_splits, image_sizes,
                                        place_split_images, staging_dir)
from cnnkit.data.images import is_image_file
from cnnkit.errors import DataError

SPLITS = ("train", "val", "test")
LINE_FIX = "write one box per line as 'class cx cy w h', the four numbers normalised to 0..1"


@dataclass
class _Source:
    """The images of one split, the label folders to search for orphans, where the split was named."""

    images: list[Path] = field(default_factory=list)
    label_dirs: list[tuple[Path, Path]] = field(default_factory=list)  # (images folder, labels folder)


def label_path_for(image: Path) -> Path:
    """ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _images_in(folder: Path) -> list[Path]:
    return [p for p in config.list_tree(folder) if is_image_file(p)]


def _labels_dir_for(folder: Path) -> Path | None:
    parts = list(folder.parts)
    if "images" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts)


def _add_folder(source: _Source, folder: Path) -> None:
    source.images += _images_in(folder)
    labels = _labels_dir_for(folder)
    if labels is not None:
        source.label_dirs.append((folder, labels))


def _read_list_file(file: Path, error, root: Path) -> list[Path]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read image list {file}: {exc}", fix="give a UTF-8 text file, one image per line")
    out = []
    for lineno, raw in enumerate(lines, 1):
        text = raw.strip()
        if text:
            p = config.resolve_inside(root, file.parent / config.expand_user(text))
            if p is None:
                raise DataError(f"{config.OUTSIDE_ROOT}: image {text!r} lies outside the dataset root {root}",
                                path=str(file), line=lineno, fix=f"list only images inside {root}")
            out.append(p)
    return out


def _names_from_classes_txt(*folders: Path) -> list[str] | None:
    for folder in folders:
        f = folder / "classes.txt"
        if f.is_file():
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read the class names: {' '.join(str(exc).split())}", path=str(f),
                                fix="save it as UTF-8 text, one class name a line") from None
            names = [line.strip() for line in text.splitlines() if line.strip()]
            if names:
                return names
    return None


def _read_yaml(file: Path) -> tuple[Path, dict[str, _Source], list[str]]:
    node = config._compose(file)
    if not isinstance(node, yaml.MappingNode):
        raise DataError("a data YAML must be a mapping of keys (path, train, val, names)", path=str(file),
                        line=node.start_mark.line + 1 if node is not None else None,
                        fix="write one 'key: value' per line")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    values = config._construct(node)

    def error_at(key):
        def make(message, fix=None):
            return DataError(message, path=str(file), line=lines.get(key), fix=fix)
        return make

    root = file.parent.resolve()
    if values.get("path") is not None:
        if not isinstance(values["path"], str) or "\0" in values["path"]:
            raise error_at("path")("'path' must be a folder name", fix="write path: <folder>")
        p = config.expand_user(values["path"])
        root = p if p.is_absolute() else (file.parent / p).resolve()
        config.refuse_filesystem_root(root, error_at("path"))
        if not config.is_dir(root):
            raise error_at("path")(f"'path' folder {root} does not exist",
                                   fix="correct 'path' (relative paths start at the YAML's folder)")
    sources: dict[str, _Source] = {}
    for key in SPLITS:
        value = values.get(key)
        if value is None:
            continue
        make = error_at(key)
        entries = value if isinstance(value, (list, tuple)) else [value]
        source = _Source()
        for entry in entries:
            if not isinstance(entry, str):
                raise make(f"'{key}' must name a folder or a .txt list of images, got {entry!r}",
                           fix=f"write {key}: images/{key}")
            p = config.resolve_inside(root, config.expand_user(entry))
            if p is None:
                raise make(f"{config.OUTSIDE_ROOT}: '{key}' {entry!r} points outside the dataset root {root}",
                           fix=f"give a folder inside {root}, or set 'path' to a folder that holds it")
            if config.is_dir(p):
                _add_folder(source, p)
            elif config.is_file(p) and p.suffix.lower() == ".txt":
                source.images += _read_list_file(p, make, root)
            elif config.is_file(p):
                raise make(f"'{key}' names {p}, which is neither a folder nor a .txt list of images",
                           fix=f"point '{key}' at the images folder, e.g. images/{key}")
            else:
                raise make(f"'{key}' folder {p} does not exist",
                           fix=f"create it or correct '{key}' (relative to 'path' = {root})")
        sources[key] = source
    if values.get("names") is not None:
        names = config._parse_names(values["names"], error_at("names"))
    else:
        names = _names_from_classes_txt(root, file.parent)
        if names is None:
            raise error_at(None)("no class names: the YAML has no 'names' and there is no classes.txt",
                                 fix="add names: [cat, dog] (class 0, class 1, ...)")
    nc = values.get("nc")
    if nc is not None and nc != len(names):
        raise error_at("nc")(f"nc is {nc} but 'names' lists {len(names)} classes",
                             fix="make nc match names, or drop nc")
    if not sources:  # a train split is the loader's demand; a val- or test-only file converts fine
        raise error_at(None)("no 'train', 'val' or 'test' images named",
                             fix="add 'train: images/train' (relative to 'path')")
    return root, sources, names


def _find_yaml(folder: Path) -> Path | None:
    if (folder / "data.yaml").is_file():
        return folder / "data.yaml"
    found = sorted(list(folder.glob("*.yaml")) + list(folder.glob("*.yml")))
    return found[0] if len(found) == 1 else None


def _read_folder(root: Path) -> tuple[dict[str, _Source], list[str]]:
    images = root / "images"
    if not images.is_dir():
        raise DataError("no data YAML and no images/ folder", path=str(root),
                        fix="add a data.yaml (train, val, names), or use images/<split>/ + labels/<split>/")
    sources: dict[str, _Source] = {}
    subdirs = sorted(d for d in images.iterdir() if d.is_dir())
    for d in subdirs:
        source = _Source()
        _add_folder(source, d)
        sources[d.name] = source
    loose = sorted(p for p in images.iterdir() if p.is_file() and is_image_file(p))
    if loose or not subdirs:
        sources.setdefault("train", _Source()).images += loose
        if not subdirs:
            sources["train"].label_dirs.append((images, root / "labels"))
    names = _names_from_classes_txt(root, root / "labels")
    if names is None:
        raise DataError("no class names: no data YAML and no classes.txt", path=str(root),
                        fix="add a data.yaml with names: [...] or a classes.txt, one name per line")
    return sources, names


def _parse_labels(label: Path, width: int, height: int, n_classes: int, problems: Problems,
                  with_scores: bool = False
                  ) -> tuple[list[tuple[float, float, float, float]], list[int], list[float]] | None:
    """Boxes, classes and (with_scores) confidences of one label file (good lines only); None when
    the whole file is bad."""
    try:
        text = label.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.report(MALFORMED_FILE, "not UTF-8 text", label, fix=LINE_FIX)
        return None
    boxes, classes, scores = [], [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        n = len(fields)
        if with_scores and n != 6:
            problems.report(MALFORMED_LINE, f"{n} fields, expected 6 in a prediction (class cx cy w h score)",
                            label, lineno, fix="read labels without with_scores, or correct the line")
            continue
        if not with_scores and n != 5 and (n < 7 or n % 2 == 0):
            problems.report(MALFORMED_LINE, f"{n} fields, expected 5 (class cx cy w h) or a polygon "
                            "(class x1 y1 x2 y2 x3 y3 ...)" + (" (a prediction with its score? read it with "
                                                             "with_scores=True)" if n == 6 else ""),
                            label, lineno, fix=LINE_FIX)
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not is_number(f))
            problems.report(MALFORMED_LINE, f"{bad!r} is not a number", label, lineno, fix=LINE_FIX)
            continue
        if not values[0].is_integer():
            problems.report(MALFORMED_LINE, f"class id {fields[0]!r} is not an integer", label, lineno, fix=LINE_FIX)
            continue
        if with_scores and not math.isfinite(values[5]):
            problems.report(MALFORMED_LINE, f"score {fields[5]!r} is not a finite number", label, lineno,
                            fix="correct the line")
            continue
        cls = int(values[0])
        if not 0 <= cls < n_classes:
            problems.report(CLASS_OUT_OF_RANGE, f"class {cls}, but names has {n_classes} classes (0..{n_classes - 1})",
                            label, lineno, fix="correct the class id or add the class to 'names'")
            continue
        if n in (5, 6):
            cx, cy, w, h = values[1:5]
            if w < 0 or h < 0 or (not with_scores and (w == 0 or h == 0)):  # a prediction may be degenerate
                problems.report(BOX_EMPTY, f"normalised width {fields[3]}, height {fields[4]}", label, lineno,
                                fix="delete the line or give the box a positive size")
                continue
            x1, y1, x2, y2 = (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
        else:
            xs, ys = values[1::2], values[2::2]
            x1, y1, x2, y2 = min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height
        box, kind, detail = check_box(x1, y1, x2, y2, width, height, allow_empty=with_scores)
        if box is None:
            problems.report(kind, detail, label, lineno, fix="correct the box (YOLO numbers are fractions "
                            "of the image width and height)")
            continue
        boxes.append(box)
        classes.append(cls)
        scores.append(values[5] if with_scores else 1.0)
    return boxes, classes, scores


def is_number(text: str) -> bool:
    """Whether `text` parses as a float (label fields; report table cells)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_yolo(src: str | os.PathLike, *, on_bad_label: str = "error", with_scores: bool = False) -> DetectionSplits:
    """Read a data YAML, or a folder holding one (data.yaml) or images/<split>/ + labels/<split>/.
    `with_scores`: read predictions (`class cx cy w h score` lines), the scores into `record.scores`."""
    problems = Problems(on_bad_label)
    path = Path(src).expanduser()
    if config.is_file(path):
        root, sources, names = _read_yaml(path)
    elif config.is_dir(path):
        found = _find_yaml(path)
        if found is not None:
            path = found
            root, sources, names = _read_yaml(found)
        else:
            root = path.resolve()
            sources, names = _read_folder(root)
    else:
        raise DataError("no such file or folder", path=str(path), fix="give the data YAML or the dataset folder")

    splits: dict[str, list] = {}
    notes: list[str] = []
    for split, source in sources.items():
        images = list(dict.fromkeys(source.images))
        sizes = image_sizes([str(p) for p in images])
        records = []
        for image, (size, reason) in zip(images, sizes):
            if size is None:
                if not config.exists(image):
                    problems.report(IMAGE_NOT_FOUND, f"listed for split {split!r} but missing", image,
                                    fix="correct the image list")
                else:
                    problems.report(UNREADABLE_IMAGE, reason, image, fix="replace or delete the image")
                continue
            width, height = size
            label = label_path_for(image)
            boxes, classes, scores = [], [], []
            if config.is_file(label):
                parsed = _parse_labels(label, width, height, len(names), problems, with_scores)
                if parsed is None:
                    continue
                boxes, classes, scores = parsed
            records.append(DetectionRecord(image, width, height, boxes, classes,
                                           scores=scores if with_scores else None))
        if images and not any(config.is_file(label_path_for(p)) for p in images):
            notes.append(f"split {split!r}: no label files found (looked for {label_path_for(images[0])}, ...); "
                         "every image is a background image")
        wanted = {label_path_for(p) for p in images}
        for _, labels_dir in source.label_dirs:
            if not labels_dir.is_dir():
                continue
            for label in sorted(labels_dir.rglob("*.txt")):
                if label not in wanted and not (label.name == "classes.txt" and label.parent == labels_dir):
                    problems.report(LABEL_WITHOUT_IMAGE, "no image of this name in the images folder", label,
                                    fix="add the image, or delete the label file")
        splits[split] = records
    return DetectionSplits(names=list(names), splits=splits, problems=problems.items, notes=notes, format="yolo",
                           root=path.resolve())


# ---------------------------------------------------------------- writing

def format_yolo_lines(rec: DetectionRecord) -> str:
    """The label file text of one record: `class cx cy w h` per box, 8 significant digits."""
    out = []
    for (x1, y1, x2, y2), c in zip(rec.boxes.tolist(), rec.labels.tolist()):
        cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
        w, h = (x2 - x1) / rec.width, (y2 - y1) / rec.height
        out.append(f"{c} {cx:.8g} {cy:.8g} {w:.8g} {h:.8g}\n")
    return "".join(out)


def data_yaml_text(names: list[str], splits: list[str], comment: str = "") -> str:
    """A data YAML for images/<split>/ folders beside it (no 'path': the root is the YAML's folder)."""
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    head += "# 'path' is left out: the dataset root is this file's folder\n"
    body = {s: f"images/{s}" for s in splits}
    body["nc"] = len(names)
    body["names"] = {i: n for i, n in enumerate(names)}
    return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, default_flow_style=False)


def write_yolo_labels(root: Path, splits: DetectionSplits, file_names: dict[str, list[str]],
                      comment: str = "") -> None:
    """labels/<split>/<stem>.txt for every record (empty for a background image) and data.yaml,
    for images already at images/<split>/<file_names[split][i]>. `root` is a staging folder (see
    `staging_dir`), so the files are written plainly: the whole folder appears in one rename."""
    for split, recs in splits.splits.items():
        folder = root / "labels" / split
        folder.mkdir(parents=True, exist_ok=True)
        for rec, name in zip(recs, file_names[split]):
            (folder / (os.path.splitext(name)[0] + ".txt")).write_text(format_yolo_lines(rec), encoding="utf-8")
    (root / "data.yaml").write_text(data_yaml_text(splits.names, list(splits.splits), comment), encoding="utf-8")


def write_yolo(splits: DetectionSplits, dst: str | os.PathLike, *, link: bool = True) -> Path:
    """Write images/<split>/, labels/<split>/ and data.yaml into `dst` (new or empty), atomically as
    a whole; images are hard-linked where possible, else copied. Returns `dst`."""
    check_splits(splits)
    dst = Path(dst).expanduser()
    with staging_dir(dst) as tmp:
        file_names = place_split_images(tmp, splits, link)
        write_yolo_labels(tmp, splits, file_names)
    return dst


def _is_yolo_folder(path: Path) -> bool:
    return bool(list(path.glob("*.yaml")) + list(path.glob("*.yml"))) or (path / "labels").is_dir()


register_format(DetectionFormat("yolo", read_yolo, write_yolo, file_suffixes=(".yaml", ".yml"),
                                is_dataset_folder=_is_yolo_folder, priority=20,
                                looked_for="no data YAML or labels/ (YOLO)"))
