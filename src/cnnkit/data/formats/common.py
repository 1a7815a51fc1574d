"""What the detection format readers and writers share: the in-memory records (`DetectionRecord`,
`DetectionSplits`), the box check, the problem kinds and their summary, image headers and atomic
dataset folders. The readers (`coco`, `voc`, `yolo`) import this module; `cnnkit.data.formats`
re-exports it with the readers (see its docstring for the box conventions).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from cnnkit.data.images import check_pixel_limit
from cnnkit.errors import DataError, UsageError
from cnnkit.utils import usable_cpus

ON_BAD_LABEL = ("error", "skip")
CLIP_TOLERANCE = 1.0
SKIP_HINT = "or load with on_bad_label='skip' (CLI: --on-bad-label skip) to leave it out"

# problem kinds: the text before ": " in every reason, so that a summary can count them
MALFORMED_LINE = "malformed label line"
CLASS_OUT_OF_RANGE = "class id out of range"
UNKNOWN_CLASS = "unknown class name"
BOX_OUTSIDE = "box outside the image"
BOX_EMPTY = "box of zero or negative size"
LABEL_WITHOUT_IMAGE = "label file without image"
IMAGE_NOT_FOUND = "image not found"
UNREADABLE_IMAGE = "unreadable image"
MISSING_KEY = "missing or malformed key"
UNKNOWN_IMAGE_ID = "unknown image id"
MALFORMED_XML = "malformed XML"
MALFORMED_FILE = "malformed file"
SIZE_MISMATCH = "image size differs from the labels"


@dataclass
class DetectionRecord:
    """One image and its boxes: `boxes` float64 [N, 4] XYXY absolute pixels, `labels` int64 [N].

    `width`, `height` are the image's size as displayed (after EXIF orientation); `image_id` is the
    source's own id where it has one (COCO), else None; `scores` float64 [N], the confidence of each
    box, only for predictions read back (`read_yolo(..., with_scores=True)`), else None.
    """

    image_path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    image_id: int | None = None
    scores: torch.Tensor | None = None

    def __post_init__(self):
        self.image_path = Path(self.image_path)
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float64).reshape(-1, 4)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if self.boxes.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.boxes.shape[0]} boxes but {self.labels.shape[0]} labels")
        if self.scores is not None:
            self.scores = torch.as_tensor(self.scores, dtype=torch.float64).reshape(-1)
            if self.scores.shape[0] != self.labels.shape[0]:
                raise ValueError(f"{self.scores.shape[0]} scores for {self.labels.shape[0]} boxes")


@dataclass
class DetectionSplits:
    """A whole dataset in memory: class `names`, records per split ("train", "val", "test", ...).

    `problems` lists (file, line or None, "kind: detail") of what on_bad_label="skip" left out;
    `notes` holds remarks worth printing; `format` is "yolo", "coco" or "voc"; `root` the source;
    `category_ids[label]` is the source's own id of each class where it has them (COCO), else None
    (see `coco.coco_ids` for the ids a COCO file of this data holds).
    """

    names: list[str]
    splits: dict[str, list[DetectionRecord]]
    problems: list[tuple[str, int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format: str = ""
    root: Path | None = None
    category_ids: list[int] | None = None

    def describe(self) -> str:
        """'train 2000 images / 5012 boxes, val 300 images / 740 boxes, 10 classes'."""
        parts = [f"{name} {len(recs)} images / {sum(len(r.labels) for r in recs)} boxes"
                 for name, recs in self.splits.items()]
        return ", ".join(parts + [f"{len(self.names)} classes"])


class Problems:
    """Raise or record a bad label, as on_bad_label says."""

    def __init__(self, on_bad_label: str):
        check_on_bad_label(on_bad_label)
        self.skip = on_bad_label == "skip"
        self.items: list[tuple[str, int | None, str]] = []

    def report(self, kind: str, detail: str, path: str | os.PathLike, line: int | None = None,
               fix: str | None = None) -> None:
        """Raise a DataError naming file and line, or (skip mode) record the problem and return."""
        reason = f"{kind}: {detail}"
        if not self.skip:
            raise DataError(reason, path=str(path), line=line, fix=f"{fix}, {SKIP_HINT}" if fix else
                            f"correct it, {SKIP_HINT}")
        self.items.append((str(path), line, reason))


def check_on_bad_label(value: str) -> None:
    if value not in ON_BAD_LABEL:
        raise UsageError(f"on_bad_label must be one of {', '.join(ON_BAD_LABEL)}, got {value!r}",
                         fix="use on_bad_label='error' or 'skip'")


def check_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, *, allow_empty: bool = False
              ) -> tuple[tuple[float, float, float, float] | None, str, str]:
    """(clipped box, "", "") for a good box, else (None, kind, detail). Rules in the module docstring;
    `allow_empty` lets a box of zero width or height through (a prediction can be one)."""
    values = (x1, y1, x2, y2)
    shown = "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
    if not all(math.isfinite(v) for v in values):
        return None, MALFORMED_LINE, f"box {shown} holds a non-finite number"
    if x2 < x1 or y2 < y1 or (not allow_empty and (x2 == x1 or y2 == y1)):
        return None, BOX_EMPTY, f"XYXY box {shown} is {x2 - x1:.6g} x {y2 - y1:.6g} px"
    t = CLIP_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        return None, BOX_OUTSIDE, (f"XYXY box {shown} leaves the {width}x{height} image by more than "
                                   f"{t:g} px")
    c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if (c[2] < c[0] or c[3] < c[1]) if allow_empty else (c[2] <= c[0] or c[3] <= c[1]):
        return None, BOX_EMPTY, f"XYXY box {shown} is empty once clipped to the {width}x{height} image"
    return c, "", ""


def problem_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def summarize_problems(problems: Sequence[tuple[str, int | None, str]], first: int = 3) -> str:
    """One line: counts by kind, then the first few places ('' when there are none)."""
    if not problems:
        return ""
    counts = Counter(problem_kind(reason) for _, _, reason in problems)
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    places = "; ".join(f"{p}:{line}" if line is not None else p for p, line, _ in problems[:first])
    more = f" (+{len(problems) - first} more)" if len(problems) > first else ""
    return f"{len(problems)} bad labels left out ({kinds}); first: {places}{more}"


# ---------------------------------------------------------------- image headers

def _oriented_size(path: str) -> tuple[tuple[int, int] | None, str]:
    """((width, height) as displayed, "") from the header, EXIF orientation 5-8 swapping the two."""
    try:
        with Image.open(path) as img:
            check_pixel_limit(img)
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # a malformed EXIF block: decode_image keeps such images unrotated too
                orientation = 1
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals a bad file with many exception types
        text = " ".join(str(exc).split()) or type(exc).__name__
        return None, text
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), ""


def image_sizes(paths: Sequence[str]) -> list[tuple[tuple[int, int] | None, str]]:
    """`_oriented_size` of many files, read with a small thread pool."""
    if len(paths) < 64:
        return [_oriented_size(p) for p in paths]
    with ThreadPoolExecutor(max(1, min(8, usable_cpus()))) as pool:
        return list(pool.map(_oriented_size, paths))


# ---------------------------------------------------------------- writing

@contextlib.contextmanager
def staging_dir(dst: str | os.PathLike):
    """Yield an empty temp folder beside `dst`; on success it becomes `dst` in one rename.

    `dst` must not exist or be an empty folder, so a reader never sees a half-written dataset.
    """
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError("output exists and is not an empty folder", path=str(dst),
                        fix="choose a new folder, or delete this one first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    try:
        yield tmp
        os.replace(tmp, dst)  # replaces an empty folder on POSIX
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def place_image(src: Path, dst: Path, link: bool) -> None:
    """Hard-link `src` at `dst` when `link` and the file system allows, else copy it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_file():
        raise DataError("image not found (it was there when the dataset was read)", path=str(src),
                        fix="restore the image, or read the dataset again")
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def unique_names(records: Iterable[tuple[str, DetectionRecord]]) -> list[str]:
    """A file name per (split, record): the image's own name, made unique by stem (case-insensitive)
    within the sequence given, first by prefixing the split, then by a number."""
    taken: set[str] = set()
    out = []
    for split, rec in records:
        name = rec.image_path.name
        stem, ext = os.path.splitext(name)
        candidates = [stem, f"{split}_{stem}"]
        k = 1
        while candidates[-1].lower() in taken:
            candidates.append(f"{split}_{stem}_{k}")
            k += 1
        chosen = next(c for c in candidates if c.lower() not in taken)
        taken.add(chosen.lower())
        out.append(chosen + ext)
    return out


def place_split_images(tmp: Path, splits: "DetectionSplits", link: bool) -> dict[str, list[str]]:
    """Put every split's images under tmp/images/<split>/ with clash-free names; returns the names."""
    file_names = {}
    for split, recs in splits.splits.items():
        file_names[split] = unique_names((split, r) for r in recs)
        for rec, name in zip(recs, file_names[split]):
            place_image(rec.image_path, tmp / "images" / split / name, link)
    return file_names


def check_class_name(name) -> str:
    """'' for a class name every format can hold, else what is wrong with it: labels.txt and
    classes.txt hold one stripped name a line, and XML cannot hold control characters."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if name != name.strip():
        return "starts or ends with white space"
    if len(name.splitlines()) != 1 or any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return "holds a line break or a control character"
    return ""


def check_splits(splits: DetectionSplits) -> None:
    """Refuse to write what the formats cannot hold: labels outside names, odd class names."""
    for k, name in enumerate(splits.names):
        what = check_class_name(name)
        if what:
            raise DataError(f"class name {k} ({name!r}) {what}; the files could not hold it",
                            fix="rename the class (letters, digits, spaces inside, no line breaks)")
    n = len(splits.names)
    ids = splits.category_ids
    if ids is not None and (len(ids) != n or len(set(ids)) != n
                            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise DataError(f"category_ids {list(ids)} are not {n} distinct integers, one per class name",
                        fix="give each class its own integer id, or none (ids 1..K are then written)")
    for split, recs in splits.splits.items():
        for rec in recs:
            if rec.labels.numel() and (int(rec.labels.min()) < 0 or int(rec.labels.max()) >= n):
                raise DataError(f"a label in split {split!r} is outside 0..{n - 1}", path=str(rec.image_path),
                                fix="give every class a name")


# ---------------------------------------------------------------- the format registry

@dataclass(frozen=True)
class DetectionFormat:
    """A detection annotation format as `read_any`, `detect_format` and `cnnkit data convert --to` use it.
    A format module registers one (`register_format`) at import; `cnnkit.data.formats` imports every
    module of its package, so a new format is one new file there."""

    name: str
    read: Callable[..., DetectionSplits]  # read(src, *, on_bad_label) -> DetectionSplits
    write: Callable[..., Path]  # write(splits, dst, *, link) -> the folder written
    file_suffixes: tuple[str, ...] = ()  # a file with one of these suffixes is a dataset of this format
    is_dataset_folder: Callable[[Path], bool] | None = None  # does this folder hold one?
    priority: int = 50  # folders are tried in ascending priority (the most specific layout first)
    looked_for: str = ""  # what `is_dataset_folder` looks for, said when nothing matches


FORMATS: dict[str, DetectionFormat] = {}


def register_format(fmt: DetectionFormat) -> DetectionFormat:
    if fmt.name in FORMATS and FORMATS[fmt.name] != fmt:
        raise ValueError(f"detection format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt
