"""`cnnkit data check` (issue #8): counts per split and class, every problem gathered and grouped by
kind with the first files and lines named, exit 0 / 1 / 2; and `cnnkit train` refusing the same
fatal problems before it trains (its loaders raise them; no separate pre-check is needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.check import check_dataset


def png(path: Path, w: int = 32, h: int = 24, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def text(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def truncated_png(path: Path) -> Path:
    png(path, 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads; the pixels do not
    return path


def yolo_dataset(root: Path, bad: bool) -> Path:
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            png(root / "images" / split / f"im {i}.png")
            text(root / "labels" / split / f"im {i}.txt", f"{i % 2} 0.5 0.5 0.25 0.25\n0 0.3 0.3 0.1 0.1\n")
    text(root / "data.yaml", "train: images/train\nval: images/val\nnames: [cat, dog]\n")
    if bad:
        text(root / "labels" / "train" / "im 1.txt", "1 0.5 0.5 0.25 0.25\n7 0.5 0.5 0.1 0.1\nbanana\n")
        text(root / "labels" / "train" / "im 2.txt", "0 0.5 0.5 3.0 0.2\n0 0.5 0.5 -1 0.2\n")
        text(root / "labels" / "train" / "orphan.txt", "0 0.5 0.5 0.1 0.1\n")
        truncated_png(root / "images" / "val" / "im 1.png")
    return root


def test_clean_yolo_dataset(tmp_path):
    report = check_dataset(yolo_dataset(tmp_path / "d", bad=False), "detect")
    assert report.exit_code == 0 and not report.problems
    assert report.names == ["cat", "dog"]
    assert (report.splits["train"].images, report.splits["train"].instances) == (4, 8)
    assert (report.splits["val"].images, report.splits["val"].instances) == (2, 4)
    assert report.instances == {0: 9, 1: 3}
    out = report.format()
    assert "result: OK" in out and "cat" in out and "dog" in out


def test_bad_boxes_are_all_gathered_and_non_fatal(tmp_path):
    root = yolo_dataset(tmp_path / "d", bad=True)
    report = check_dataset(root, "detect")
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["box of zero or negative size", "box outside the image", "class id out of range",
                     "label file without image", "malformed label line", "unreadable image"]
    assert not report.fatal and report.exit_code == 1
    places = {p.kind: p.where() for p in report.problems}
    assert places["class id out of range"].endswith("im 1.txt:2")
    assert places["malformed label line"].endswith("im 1.txt:3")
    assert places["box outside the image"].endswith("im 2.txt:1")
    assert places["unreadable image"].endswith("im 1.png")
    # the good boxes still count: im 0 and im 3 two each, im 1 its first line, im 2 none
    assert report.splits["train"].instances == 2 + 1 + 0 + 2
    assert report.splits["val"].images == 1  # the truncated image is not counted
    out = report.format()
    assert "class id out of range: 1" in out and "im 1.txt:2" in out and "(exit 1)" in out


def test_fast_check_reads_headers_only(tmp_path):
    root = yolo_dataset(tmp_path / "d", bad=True)
    report = check_dataset(root, "detect", decode=False)
    assert "unreadable image" not in {p.kind for p in report.problems}  # the header of the cut file reads
    assert len(report.problems) == 5 and report.exit_code == 1
    assert "--fast" in report.format()


def test_first_few_files_named_per_kind(tmp_path):
    root = yolo_dataset(tmp_path / "d", bad=False)
    for i in range(6):
        text(root / "labels" / "train" / f"extra{i}.txt", "0 0.5 0.5 0.1 0.1\n")
    report = check_dataset(root, "detect")
    out = report.format()
    assert "label file without image: 6" in out and "... 3 more" in out
    assert sum("extra" in line for line in out.splitlines()) == 3


def test_fatal_problems(tmp_path):
    # a COCO file_name outside the dataset: fatal even though skip mode would leave it out
    root = tmp_path / "coco"
    png(root / "images" / "train" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
                      {"id": 2, "file_name": "../../../../etc/passwd", "width": 32, "height": 24}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "x"}]}
    text(root / "annotations" / "instances_train.json", json.dumps(doc))
    report = check_dataset(root, "detect")
    assert report.exit_code == 2 and [p.kind for p in report.problems if p.fatal] == ["path outside the dataset"]
    # malformed YAML: one fatal problem naming the line
    bad = text(tmp_path / "y" / "data.yaml", "train: images/train\nnames: [a, b\n")
    report = check_dataset(bad, "detect")
    assert report.exit_code == 2 and report.problems[0].line is not None and "[fatal]" in report.format()
    # no train split, only val
    root = yolo_dataset(tmp_path / "v", bad=False)
    text(root / "data.yaml", "val: images/val\nnames: [cat, dog]\n")
    report = check_dataset(root, "detect")
    assert report.exit_code == 2 and "no training images" in {p.kind for p in report.problems}
    # nothing there
    assert check_dataset(tmp_path / "nothing", "detect").exit_code == 2


def test_voc_unknown_class_is_skippable(tmp_path):
    root = tmp_path / "voc"
    png(root / "JPEGImages" / "a.png")
    png(root / "JPEGImages" / "b.png")
    text(root / "labels.txt", "cat\n")
    obj = "<object><name>{}</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    text(root / "Annotations" / "a.xml", f"<annotation><filename>a.png</filename>{obj.format('cat')}</annotation>")
    text(root / "Annotations" / "b.xml", f"<annotation><filename>b.png</filename>\n{obj.format('cow')}</annotation>")
    report = check_dataset(root, "detect")
    assert [(p.kind, p.line) for p in report.problems] == [("unknown class name", 2)]
    assert report.exit_code == 1 and report.instances == {0: 1}


def test_classification_folder(tmp_path, shapes_dir):
    report = check_dataset(shapes_dir, "classify")
    assert report.exit_code == 0
    assert (report.splits["train"].images, report.splits["val"].images) == (64, 24)
    assert report.names == ["circle", "dots", "square", "stripes"] and set(report.instances.values()) == {22}
    root = tmp_path / "cls"
    for c in ("a", "b"):
        for i in range(3):
            png(root / c / f"{i}.png", value=40 * i)
    (root / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    truncated_png(root / "b" / "cut.png")
    report = check_dataset(root, "classify")
    assert sorted(Path(p.path).name for p in report.problems) == ["bad.jpg", "cut.png"]
    assert report.exit_code == 1
    for f in (root / "b").iterdir():  # every image of class b unreadable: fatal
        f.write_bytes(b"junk")
    assert check_dataset(root, "classify").exit_code == 2


def test_classification_builtin_and_yaml_errors(tmp_path):
    report = check_dataset("fashion-mnist", "classify", decode=False)
    assert report.exit_code == 0 and report.splits["train"].images == 8000 and len(report.names) == 10
    text(tmp_path / "d.yaml", "train: ../../etc\n")
    report = check_dataset(tmp_path / "d.yaml", "classify")
    assert report.exit_code == 2 and "outside" in report.problems[0].kind + report.problems[0].detail


def seg_dataset(root: Path) -> Path:
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            png(root / "images" / split / f"{i}.png", 16, 12)
            mask = np.zeros((12, 16), np.uint8)
            mask[2:6, 3:9] = 1 + i % 2
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    text(root / "classes.txt", "background\nroad\ncar\n")
    return root


def test_segmentation_problems_are_gathered_and_fatal(tmp_path):
    root = seg_dataset(tmp_path / "s")
    report = check_dataset(root, "segment")
    assert report.exit_code == 0 and report.instances == {0: 6, 1: 3, 2: 3}
    (root / "masks" / "train" / "0.png").unlink()
    (root / "masks" / "train" / "1.png").unlink()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(root / "masks" / "train" / "2.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "val" / "0.png")
    Image.fromarray(np.full((12, 16), 9, np.uint8)).save(root / "masks" / "val" / "1.png")
    report = check_dataset(root, "segment")
    assert report.exit_code == 2
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["colour mask", "mask size differs from its image", "mask value out of range", "missing mask",
                     "missing mask"]
    fast = check_dataset(root, "segment", decode=False)
    assert sorted(p.kind for p in fast.problems) == ["mask size differs from its image", "missing mask",
                                                      "missing mask"]


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    clean = yolo_dataset(tmp_path / "clean", bad=False)
    assert main(["data", "check", str(clean), "--task", "detect"]) == 0
    assert "result: OK" in capsys.readouterr().out
    bad = yolo_dataset(tmp_path / "bad", bad=True)
    assert main(["data", "check", str(bad), "--task", "detect"]) == 1
    out = capsys.readouterr().out
    assert "problems: 6 (0 fatal" in out and "im 1.txt:2" in out
    assert main(["data", "check", str(tmp_path / "missing"), "--task", "segment"]) == 2
    assert "[fatal]" in capsys.readouterr().out


@pytest.mark.parametrize("task, make", [
    ("detect", lambda root: yolo_dataset(root, bad=True)),                     # a bad box, default --on-bad-label error
    ("detect", lambda root: text(root / "data.yaml", "train: ../elsewhere\nnames: [a]\n").parent),
    ("segment", lambda root: (seg_dataset(root), (root / "masks" / "train" / "3.png").unlink(), root)[-1]),
    ("classify", lambda root: text(root / "data.yaml", "train: [a\n").parent),
])
def test_train_refuses_fatal_data_before_training(tmp_path, capsys, task, make):
    """What `data check` calls fatal (and, with the default --on-bad-label error, a bad box) stops
    `cnnkit train` before the model is built: one line, exit 2, no run folder."""
    root = make(tmp_path / "data")
    runs = tmp_path / "runs"
    code = main(["train", task, "--data", str(root), "--project", str(runs), "--weights", "none", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "data") in err
    assert not runs.exists()
