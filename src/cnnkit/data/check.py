"""`cnnkit data check DATA --task TASK`: check a dataset before training.

    report = check_dataset("coco8/data.yaml", "detect")       # every form the task's loader accepts
    print(report.format())                                     # images per split, classes, instances,
    report.exit_code                                           # problems by kind; 0 clean, 1, 2

The check reads the data through the same readers training uses, but gathers every problem
instead of stopping at the first: detection labels are read with on_bad_label="skip" (each bad
line, box, file or image becomes one problem), classification images with on_bad_image="skip",
and segmentation masks are checked one by one. With `decode=True` (the default) every image (and
mask) is decoded, so a truncated file shows; `decode=False` only reads labels and file headers.

A problem is *fatal* when training cannot start with it whatever the options (no training images,
a path outside the dataset, malformed YAML, a bad mask: segmentation has no skip mode) and
*non-fatal* when an option leaves it out (`--on-bad-label skip`, `--on-bad-image skip`).
`exit_code` is 2 when any problem is fatal, 1 when there are only non-fatal ones, 0 when clean.
Training itself needs no separate pre-check: its loaders raise the same fatal problems (and, by
default, the non-fatal ones) before the first step, with a one-line error.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from cnnkit.errors import CnnkitError, UsageError
from cnnkit.utils import usable_cpus

SHOWN = 3  # files named per kind of problem


@dataclass
class Problem:
    """One thing wrong: its kind (for grouping), where, what, and whether training must refuse it."""

    kind: str
    detail: str
    path: str | None = None
    line: int | None = None
    fatal: bool = False

    def where(self) -> str:
        if self.path is None:
            return ""
        return f"{self.path}:{self.line}" if self.line is not None else self.path


@dataclass
class SplitSummary:
    images: int = 0
    labelled: int = 0  # images with at least one box (detect) or a mask (segment) or a class (classify)
    instances: int = 0  # boxes (detect), images (classify), images holding a class (segment)


@dataclass
class CheckReport:
    """What `check_dataset` found; `format()` is the printed summary."""

    task: str
    spec: str
    source: str = ""
    names: list[str] = field(default_factory=list)
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    instances: Counter = field(default_factory=Counter)  # class index -> count
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    decoded: bool = True
    columns: tuple[str, str] = ("", "")  # the split table's extra columns: (images with labels, instances)
    unit: str = "images"  # what an instance of a class is

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.problems)

    @property
    def exit_code(self) -> int:
        return 2 if self.fatal else (1 if self.problems else 0)

    def add(self, kind: str, detail: str, path=None, line=None, *, fatal: bool = False) -> None:
        self.problems.append(Problem(kind, detail, None if path is None else str(path), line, fatal))

    def add_error(self, exc: CnnkitError) -> None:
        """A reader's error: fatal, its kind the text before ':' when the reader gave one."""
        reason = exc.reason
        kind, _, rest = reason.partition(": ")
        if not rest or len(kind) > 40:
            kind, rest = "cannot load the dataset", reason
        detail = f"{rest} (fix: {exc.fix})" if exc.fix else rest
        self.add(kind, detail, exc.path, exc.line, fatal=True)

    def format(self, first: int = SHOWN) -> str:
        what = self.columns
        lines = [f"data check ({self.task}): {self.source or self.spec}"
                 + ("" if self.decoded else " [headers and labels only: --fast]")]
        if self.splits:
            cols = ["split", "images"] + [c for c in what if c]
            lines.append("  " + "  ".join(f"{c:>9s}" if i else f"{c:<8s}" for i, c in enumerate(cols)))
            for name, s in self.splits.items():
                vals = [s.images] + ([s.labelled] if what[0] else []) + ([s.instances] if what[1] else [])
                lines.append(f"  {name:<8s}  " + "  ".join(f"{v:>9,d}" for v in vals))
        if self.names:
            shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
            lines.append(f"classes: {len(self.names)} ({shown})")
        if self.instances:
            unit = self.unit
            lines.append(f"instances per class ({unit}, all splits):")
            width = max(len(n) for n in self.names) if self.names else 8
            for k, name in enumerate(self.names):
                lines.append(f"  {k:>3d} {name:<{width}s} {self.instances.get(k, 0):>9,d}")
            unused = [self.names[k] for k in range(len(self.names)) if not self.instances.get(k)]
            if unused:
                lines.append(f"  no instance of: {', '.join(unused[:10])}" + (" ..." if len(unused) > 10 else ""))
        lines += [f"note: {n}" for n in self.notes]
        if self.problems:
            n_fatal = sum(p.fatal for p in self.problems)
            lines.append(f"problems: {len(self.problems)} ({n_fatal} fatal, {len(self.problems) - n_fatal} "
                         "that --on-bad-label / --on-bad-image skip would leave out)")
            groups: dict[tuple[bool, str], list[Problem]] = {}
            for p in self.problems:
                groups.setdefault((not p.fatal, p.kind), []).append(p)
            for (nonfatal, kind), items in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
                lines.append(f"  {'' if nonfatal else '[fatal] '}{kind}: {len(items)}")
                for p in items[:first]:
                    where = p.where()
                    lines.append(f"    {where + ': ' if where else ''}{p.detail}")
                if len(items) > first:
                    lines.append(f"    ... {len(items) - first} more")
        verdict = {0: "OK: no problems found", 1: "usable with --on-bad-label skip / --on-bad-image skip "
                   "(non-fatal problems)", 2: "NOT usable: fix the fatal problems first"}[self.exit_code]
        lines.append(f"result: {verdict} (exit {self.exit_code})")
        return "\n".join(lines)


def check_dataset(spec: str | os.PathLike, task: str, *, decode: bool = True) -> CheckReport:
    """Check a dataset for the registered task `task` (`Task.check_data`); see the module docstring."""
    from cnnkit.taskapi import get_task

    return get_task(task).check_data(spec, decode=decode)


def _run(checker, task: str, spec, decode: bool, **shape) -> CheckReport:
    report = CheckReport(task=task, spec=os.fspath(spec), decoded=decode, **shape)
    try:
        checker(report, os.fspath(spec), decode)
    except CnnkitError as exc:
        report.add_error(exc)
    return report


def check_detection(spec, task: str, *, decode: bool = True) -> CheckReport:
    """Boxes data as the detection readers read it (YOLO txt, COCO JSON, VOC XML, the built-in scenes)."""
    return _run(_check_detect, task, spec, decode, columns=("labelled", "boxes"), unit="boxes")


def check_classification(spec, task: str, *, decode: bool = True) -> CheckReport:
    """Class-per-image data as the classification readers read it (folders, IDX, built-in)."""
    return _run(_check_classify, task, spec, decode, unit="images")


def check_segmentation(spec, task: str, *, decode: bool = True) -> CheckReport:
    """Image + index-mask pairs as the segmentation reader reads them."""
    return _run(_check_segment, task, spec, decode, unit="images showing it")


# ---------------------------------------------------------------- decoding many files

def _workers() -> int:
    return max(1, min(8, usable_cpus()))


def _decode_all(paths: Sequence[str]) -> list[tuple[tuple[int, int] | None, str]]:
    """((height, width) as decoded, "") or (None, reason) for every file; the pixels are dropped."""
    from cnnkit.data.images import _array_or_reason

    def one(path: str):
        array, reason = _array_or_reason(path)
        return (tuple(array.shape[:2]), "") if array is not None else (None, reason)
    if len(paths) < 16:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(_workers()) as pool:
        return list(pool.map(one, paths))


# ---------------------------------------------------------------- detection

def _check_detect(report: CheckReport, spec: str, decode: bool) -> None:
    from cnnkit.data.config import OUTSIDE_ROOT
    from cnnkit.data.detection import BUILTIN_DETECTION
    from cnnkit.data.formats import SIZE_MISMATCH, UNREADABLE_IMAGE, problem_kind, read_any, read_yolo
    from cnnkit.errors import DataError

    if spec in BUILTIN_DETECTION:
        from cnnkit.data.scenes import ensure_scenes

        splits = read_yolo(ensure_scenes() / "data.yaml", on_bad_label="skip")
    else:
        from cnnkit.data.config import exists, expand_user

        if not exists(expand_user(spec)):
            raise DataError("dataset not found: no such file or folder", path=spec,
                            fix="give a data YAML, a YOLO / COCO / VOC folder, or the built-in name 'scenes'")
        splits = read_any(spec, on_bad_label="skip")
    report.source = f"{spec} ({splits.format})"
    report.names = list(splits.names)
    report.notes += splits.notes
    for path, line, reason in splits.problems:
        kind = problem_kind(reason)
        report.add(kind, reason[len(kind) + 2:] or reason, path, line, fatal=kind == OUTSIDE_ROOT)
    if not splits.splits.get("train"):
        report.add("no training images", "the dataset has no train split with images", splits.root or spec,
                   fatal=True)
    if "val" in splits.splits and not splits.splits["val"]:
        report.add("no validation images", "the val split has no images", splits.root or spec, fatal=True)
    if "val" not in splits.splits and splits.splits.get("train"):
        report.notes.append("no val split: training holds out 20% of the train images")
    for name, records in splits.splits.items():
        if decode:
            decoded = _decode_all([str(r.image_path) for r in records])
            kept = []
            for rec, (shape, reason) in zip(records, decoded):
                if shape is None:
                    report.add(UNREADABLE_IMAGE, reason, rec.image_path)
                elif shape != (rec.height, rec.width):
                    report.add(SIZE_MISMATCH, f"decoded {shape[1]}x{shape[0]}, labels say {rec.width}x{rec.height}",
                               rec.image_path)
                else:
                    kept.append(rec)
            records = kept
        s = report.splits[name] = SplitSummary()
        for rec in records:
            s.images += 1
            s.labelled += bool(len(rec.labels))
            s.instances += len(rec.labels)
            report.instances.update(rec.labels.tolist())


# ---------------------------------------------------------------- classification

def _check_classify(report: CheckReport, spec: str, decode: bool) -> None:
    from cnnkit.data.classification import load_classification_data
    from cnnkit.data.images import BAD_IMAGE_FIX

    data = load_classification_data(spec, on_bad_image="skip", cache_bytes=0)  # headers only: decoded below
    report.source = data.source
    report.names = list(data.names)
    report.notes += data.notes
    for path, reason in data.skipped:
        report.add("unreadable image", f"{reason} ({BAD_IMAGE_FIX})", path)
    lost: set[int] = set()
    for name, ds in (("train", data.train), ("val", data.val)):
        labels = [int(v) for v in ds.labels.tolist()]
        paths = getattr(ds, "paths", None)
        if decode and paths is not None:
            good = []
            for path, label, (shape, reason) in zip(paths, labels, _decode_all(paths)):
                if shape is None:
                    report.add("unreadable image", f"{reason} ({BAD_IMAGE_FIX})", path)
                else:
                    good.append(label)
            labels = good
        report.splits[name] = SplitSummary(images=len(labels), labelled=len(labels), instances=len(labels))
        report.instances.update(labels)
        if name == "train":
            lost = {int(v) for v in ds.labels.tolist()} - set(labels)
    for k in sorted(lost):
        report.add("class without training images", f"class {k} ({report.names[k]!r}): every train image is "
                   "unreadable", fatal=True)


# ---------------------------------------------------------------- segmentation

def _check_segment(report: CheckReport, spec: str, decode: bool) -> None:
    from cnnkit.data import segmentation as seg
    from cnnkit.data.images import read_image_size

    missing: list = []
    src = seg._read_source(spec, missing)
    report.source = src.label
    report.notes += src.notes
    for image, mask in missing:
        report.add("missing mask", f"no mask for this image: expected {mask}", image, fatal=True)
    ignore = src.ignore_index
    num_classes = len(src.names) if src.names else None
    largest = -1
    present: Counter = Counter()
    for name, pairs in src.splits.items():
        s = report.splits[name] = SplitSummary()
        images = _decode_all([str(i) for i, _ in pairs]) if decode else [(None, "") for _ in pairs]
        for (image, mask), (shape, reason) in zip(pairs, images):
            try:
                if decode:
                    if shape is None:
                        report.add("unreadable image", reason, image, fatal=True)
                        continue
                    a = seg._mask_array(mask, num_classes, ignore)
                    if a.shape != shape:
                        raise seg._size_mismatch(mask, image, a.shape[::-1], shape[::-1])
                    values = {int(v) for v in set(a.ravel().tolist()) if v != ignore}
                    present.update(values)
                    largest = max([largest, *values])
                else:
                    iw, ih = read_image_size(image)
                    mw, mh = seg._mask_size(mask)
                    if (mw, mh) not in ((iw, ih), (ih, iw)):
                        raise seg._size_mismatch(mask, image, (mw, mh), (iw, ih))
            except CnnkitError as exc:
                report.add(_segment_kind(exc.reason), exc.reason, exc.path, exc.line, fatal=True)
                continue
            s.images += 1
            s.labelled += 1
    if src.names:
        report.names = list(src.names)
    elif decode:
        if largest > ignore:
            report.add("mask value above the ignore index", f"mask values go up to {largest}, past the ignore "
                       f"index {ignore}", src.root or spec, fatal=True)
        report.names = ["background"] + [f"class_{v}" for v in range(1, max(largest, 0) + 1)]
        report.notes.append("no class names given: classes named by mask value (add classes.txt to name them)")
    if decode:
        report.instances = Counter({k: n for k, n in present.items() if k < len(report.names)})
    if "val" not in src.splits:
        n = report.splits["train"].images if "train" in report.splits else 0
        report.notes.append("no val split: training holds out 20% of the train images")
        if n == 1:
            report.add("too few images", "one image is too few to split into train and val", src.root or spec,
                       fatal=True)


def _segment_kind(reason: str) -> str:
    for needle, kind in (("cannot read mask", "unreadable mask"), ("colour mask", "colour mask"),
                         ("float mask", "colour mask"), ("outside the", "mask value out of range"),
                         ("mask is", "mask size differs from its image"), ("cannot decode", "unreadable image"),
                         ("cannot read image", "unreadable image")):
        if needle in reason:
            return kind
    return "bad mask"
