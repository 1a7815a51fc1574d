"""Detection data: YOLO / COCO / VOC read and write, bad labels, the scene generator, the datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data import scenes
from cnnkit.data.convert import convert
from cnnkit.data.detection import DetectionDataset, detection_collate, load_detection_data
from cnnkit.data.formats import (DetectionRecord, DetectionSplits, detect_format, read_any, read_coco, read_voc,
                                 read_yolo, summarize_problems, write_coco, write_voc, write_yolo)
from cnnkit.errors import DataError, ShapeError, UsageError

NAMES = ["cat", "dog", "bird"]


# ---------------------------------------------------------------- helpers

def save_image(path: Path, w: int, h: int, value: int = 90, fmt: str = "PNG", exif: Image.Exif | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (w, h), (value, 255 - value, (3 * value) % 256))
    img.save(path, fmt, **({"exif": exif} if exif is not None else {}))


def make_yolo(root: Path, files: dict[str, dict[str, tuple[int, int, str | None]]], names=NAMES) -> Path:
    """files[split][stem] = (w, h, label text or None for no label file); returns data.yaml."""
    for split, entries in files.items():
        for i, (stem, (w, h, text)) in enumerate(entries.items()):
            save_image(root / "images" / split / f"{stem}.png", w, h, value=10 * i)
            if text is not None:
                (root / "labels" / split).mkdir(parents=True, exist_ok=True)
                (root / "labels" / split / f"{stem}.txt").write_text(text)
    yaml_text = "".join(f"{s}: images/{s}\n" for s in files) + f"names: {json.dumps(names)}\n"
    (root / "data.yaml").write_text(yaml_text)
    return root / "data.yaml"


def by_name(splits: DetectionSplits) -> dict[str, dict[str, DetectionRecord]]:
    return {s: {r.image_path.name: r for r in recs} for s, recs in splits.splits.items()}


def assert_same_records(a: DetectionSplits, b: DetectionSplits, atol=1e-3):
    assert a.names == b.names
    ra, rb = by_name(a), by_name(b)
    assert ra.keys() == rb.keys()
    for split in ra:
        assert ra[split].keys() == rb[split].keys(), split
        for name, x in ra[split].items():
            y = rb[split][name]
            assert (x.width, x.height) == (y.width, y.height)
            assert torch.equal(x.labels, y.labels), name
            assert torch.allclose(x.boxes, y.boxes, atol=atol, rtol=0), (name, x.boxes, y.boxes)
            assert x.image_path.read_bytes() == y.image_path.read_bytes()


def raises_at(fn, path_part: str, line: int | None, *words: str) -> DataError:
    with pytest.raises(DataError) as info:
        fn()
    err = info.value
    assert path_part in str(err.path), (err.path, str(err))
    assert err.line == line, str(err)
    text = str(err)
    if line is not None:
        assert f":{line}:" in text
    for w in words:
        assert w in text, text
    return err


# ---------------------------------------------------------------- conventions on a hand-made example

# image 100 x 80, one box covering columns 10..49 and rows 20..59: XYXY (10, 20, 50, 60)
YOLO_LINE = "1 0.3 0.5 0.4 0.5"
COCO_BBOX = [10, 20, 40, 40]
VOC_BOX = (11, 21, 50, 60)


def test_one_box_in_all_three_formats(tmp_path):
    make_yolo(tmp_path / "y", {"train": {"a": (100, 80, YOLO_LINE + "\n")}, "val": {"b": (100, 80, "")}})
    coco = tmp_path / "c"
    save_image(coco / "images" / "train" / "a.png", 100, 80)
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 12, "bbox": COCO_BBOX}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 12, "name": "dog"}, {"id": 30, "name": "bird"}]}))
    voc = tmp_path / "v"
    save_image(voc / "JPEGImages" / "a.png", 100, 80)
    (voc / "Annotations").mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>100</width><height>80</height></size>"
        "<object><name>dog</name><bndbox><xmin>%d</xmin><ymin>%d</ymin><xmax>%d</xmax><ymax>%d</ymax>"
        "</bndbox></object></annotation>" % VOC_BOX)
    (voc / "labels.txt").write_text("cat\ndog\nbird\n")
    expected = torch.tensor([[10.0, 20.0, 50.0, 60.0]], dtype=torch.float64)
    for reader, src in ((read_yolo, tmp_path / "y"), (read_coco, coco), (read_voc, voc)):
        data = reader(src)
        rec = data.splits["train"][0]
        assert data.names == NAMES
        assert (rec.width, rec.height) == (100, 80)
        assert torch.allclose(rec.boxes, expected, atol=1e-9), reader.__name__
        assert rec.labels.tolist() == [1]

    # and written back: the same numbers in each format's own convention
    data = read_yolo(tmp_path / "y")
    write_yolo(data, tmp_path / "y2")
    assert (tmp_path / "y2" / "labels" / "train" / "a.txt").read_text().strip() == YOLO_LINE
    assert (tmp_path / "y2" / "labels" / "val" / "b.txt").read_text() == ""
    write_coco(data, tmp_path / "c2")
    doc = json.loads((tmp_path / "c2" / "annotations" / "instances_train.json").read_text())
    assert doc["annotations"][0]["bbox"] == COCO_BBOX and doc["annotations"][0]["category_id"] == 2
    assert doc["categories"][1] == {"id": 2, "name": "dog", "supercategory": ""}
    write_voc(data, tmp_path / "v2")
    xml = (tmp_path / "v2" / "Annotations" / "a.xml").read_text()
    for key, v in zip(("xmin", "ymin", "xmax", "ymax"), VOC_BOX):
        assert f"<{key}>{v}</{key}>" in xml
    assert (tmp_path / "v2" / "ImageSets" / "Main" / "train.txt").read_text() == "a\n"


def random_splits(root: Path, seed: int = 0) -> DetectionSplits:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", 6), ("val", 3)):
        recs = []
        for i in range(n):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            path = root / "src" / split / f"{split}{i}.{'png' if i % 2 else 'jpg'}"
            save_image(path, w, h, value=20 * i + (split == "val"), fmt="PNG" if i % 2 else "JPEG")
            k = 0 if i == 0 else int(rng.integers(1, 5))  # the first image of each split is a background
            x1, y1 = rng.uniform(0, w - 5, k), rng.uniform(0, h - 5, k)
            x2, y2 = x1 + rng.uniform(1, w - x1), y1 + rng.uniform(1, h - y1)
            boxes = np.stack([x1, y1, np.minimum(x2, w), np.minimum(y2, h)], 1)
            recs.append(DetectionRecord(path, w, h, boxes, rng.integers(0, len(NAMES), k)))
        splits[split] = recs
    return DetectionSplits(names=list(NAMES), splits=splits)


def test_round_trip_yolo_coco_voc_yolo(tmp_path):
    original = random_splits(tmp_path)
    y0 = read_yolo(write_yolo(original, tmp_path / "y0"))
    assert_same_records(original, y0)
    c = read_coco(write_coco(y0, tmp_path / "coco"))
    v = read_voc(write_voc(c, tmp_path / "voc"))
    y1 = read_any(write_yolo(v, tmp_path / "y1"))
    for step in (c, v, y1):
        assert_same_records(y0, step)
    assert [r.labels.numel() for r in y1.splits["train"]][0] == 0
    assert (c.format, v.format, y1.format) == ("coco", "voc", "yolo")


def test_convert_summary_and_refuses_non_empty_output(tmp_path):
    write_yolo(random_splits(tmp_path), tmp_path / "y")
    text = convert(tmp_path / "y", tmp_path / "out", to="voc")
    assert text.startswith("yolo -> voc: train 6 images") and "3 classes" in text
    assert detect_format(tmp_path / "out") == "voc"
    with pytest.raises(DataError, match="not an empty folder"):
        convert(tmp_path / "y", tmp_path / "out", to="coco")
    with pytest.raises(Exception, match="unknown output format"):
        convert(tmp_path / "y", tmp_path / "out2", to="csv")


def test_name_collisions_across_splits_get_unique_voc_ids(tmp_path):
    data = read_yolo(make_yolo(tmp_path / "y", {"train": {"x": (30, 30, "0 .5 .5 .5 .5")},
                                                 "val": {"x": (40, 40, "2 .5 .5 .2 .2")}}))
    v = read_voc(write_voc(data, tmp_path / "v"))
    assert [r.image_path.name for r in v.splits["val"]] == ["val_x.png"]
    assert v.splits["val"][0].labels.tolist() == [2] and v.splits["train"][0].width == 30


# ---------------------------------------------------------------- bad input: YOLO txt

@pytest.mark.parametrize("line, words", [
    ("1 0.5 0.5 0.2", ["malformed label line", "4 fields"]),
    ("1 0.5 0.5 0.2 0.2 0.9", ["6 fields"]),
    ("1 0.5 abc 0.2 0.2", ["'abc' is not a number"]),
    ("1.5 0.5 0.5 0.2 0.2", ["not an integer"]),
    ("3 0.5 0.5 0.2 0.2", ["class id out of range", "class 3", "0..2"]),
    ("-1 0.5 0.5 0.2 0.2", ["class id out of range"]),
    ("0 0.9 0.5 0.4 0.2", ["box outside the image"]),
    ("0 0.5 0.5 0 0.2", ["box of zero or negative size"]),
    ("0 0.5 0.5 0.2 -0.1", ["box of zero or negative size"]),
    ("0 nan 0.5 0.2 0.2", ["non-finite"]),
])
def test_bad_yolo_line_names_file_and_line(tmp_path, line, words):
    make_yolo(tmp_path, {"train": {"a": (100, 50, f"0 0.5 0.5 0.2 0.2\n\n{line}\n")}})
    raises_at(lambda: read_yolo(tmp_path / "data.yaml"), "a.txt", 3, *words, "fix:")


def test_tiny_overshoot_is_clipped_large_one_is_not(tmp_path):
    # x2 = (0.9 + 0.2/2) * 100 + 0.5 = 100.5: half a pixel out, clipped
    make_yolo(tmp_path / "ok", {"train": {"a": (100, 50, "0 0.905 0.5 0.2 0.2\n0 0.5 -0.005 0.2 0.02")}})
    rec = read_yolo(tmp_path / "ok").splits["train"][0]
    assert torch.allclose(rec.boxes, torch.tensor([[80.5, 20, 100, 30], [40, 0, 60, 0.25]], dtype=torch.float64))
    make_yolo(tmp_path / "bad", {"train": {"a": (100, 50, "0 0.92 0.5 0.2 0.2")}})  # 2 px out
    raises_at(lambda: read_yolo(tmp_path / "bad"), "a.txt", 1, "box outside the image", "100x50")


def test_polygon_lines_count_as_their_box_and_missing_labels_are_noted(tmp_path):
    make_yolo(tmp_path / "a", {"train": {"a": (100, 50, "2 0.1 0.2 0.5 0.1 0.3 0.9\n")}})
    rec = read_yolo(tmp_path / "a").splits["train"][0]
    assert rec.labels.tolist() == [2]
    assert torch.allclose(rec.boxes, torch.tensor([[10.0, 5, 50, 45]], dtype=torch.float64))
    make_yolo(tmp_path / "b", {"train": {"a": (10, 10, None)}})
    assert "no label files found" in read_yolo(tmp_path / "b").notes[0]
    with pytest.raises(UsageError, match="on_bad_label"):
        read_yolo(tmp_path / "b", on_bad_label="ignore")


def test_label_file_without_image(tmp_path):
    make_yolo(tmp_path, {"train": {"a": (20, 20, "0 .5 .5 .5 .5")}})
    (tmp_path / "labels" / "train" / "ghost.txt").write_text("0 .5 .5 .5 .5\n")
    raises_at(lambda: read_yolo(tmp_path / "data.yaml"), "ghost.txt", None, "label file without image")
    data = read_yolo(tmp_path / "data.yaml", on_bad_label="skip")
    assert len(data.splits["train"]) == 1
    assert data.problems == [(str(tmp_path / "labels" / "train" / "ghost.txt"), None,
                              "label file without image: no image of this name in the images folder")]


def test_skip_mode_keeps_good_boxes_and_counts_bad_ones(tmp_path):
    text = "0 .5 .5 .2 .2\n7 .5 .5 .2 .2\n1 .5 .5\n2 .3 .3 .1 .1\n0 1.5 .5 .2 .2\n"
    make_yolo(tmp_path, {"train": {"a": (100, 100, text), "b": (50, 50, "9 .5 .5 .1 .1")}, "val": {"c": (9, 9, None)}})
    data = read_yolo(tmp_path, on_bad_label="skip")
    a = by_name(data)["train"]["a.png"]
    assert a.labels.tolist() == [0, 2]
    assert by_name(data)["train"]["b.png"].labels.numel() == 0
    assert [(Path(p).name, line) for p, line, _ in data.problems] == [("a.txt", 2), ("a.txt", 3), ("a.txt", 5),
                                                                      ("b.txt", 1)]
    summary = summarize_problems(data.problems)
    assert summary.startswith("4 bad labels left out (2 class id out of range, 1 malformed label line, "
                              "1 box outside the image)")
    assert f"{tmp_path / 'labels' / 'train' / 'a.txt'}:2" in summary
    assert summarize_problems([]) == ""


def test_background_images_and_yaml_errors(tmp_path):
    make_yolo(tmp_path, {"train": {"a": (30, 20, None), "b": (30, 20, "")}, "val": {"c": (30, 20, None)}})
    data = load_detection_data(tmp_path / "data.yaml")
    image, target = data.train[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert tuple(target["boxes"].canvas_size) == (20, 30) and image.shape == (3, 20, 30)
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/nope\nnames: [a]\n")
    raises_at(lambda: read_yolo(tmp_path / "data.yaml"), "data.yaml", 2, "does not exist")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\n")
    raises_at(lambda: read_yolo(tmp_path / "data.yaml"), "data.yaml", None, "no class names")


def test_folder_without_yaml_uses_classes_txt_and_splits_val(tmp_path):
    for i in range(10):
        save_image(tmp_path / "images" / f"{i}.png", 16, 16, value=i)
        (tmp_path / "labels").mkdir(exist_ok=True)
        (tmp_path / "labels" / f"{i}.txt").write_text(f"{i % 2} .5 .5 .5 .5\n")
    (tmp_path / "classes.txt").write_text("even\nodd\n")
    data = load_detection_data(tmp_path)
    assert data.names == ["even", "odd"] and (len(data.train), len(data.val)) == (8, 2)
    assert any("no val split" in n for n in data.notes)


# ---------------------------------------------------------------- bad input: COCO JSON

def coco_dir(root: Path, images=None, annotations=None, categories=None, drop=None) -> Path:
    save_image(root / "images" / "train" / "a.png", 40, 30)
    doc = {"images": images if images is not None else [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
           "annotations": annotations if annotations is not None else [],
           "categories": categories if categories is not None else [{"id": 1, "name": "cat"}]}
    if drop:
        del doc[drop]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(doc, indent=1))
    return root


@pytest.mark.parametrize("ann, words", [
    ({"id": 9, "image_id": 1, "category_id": 1}, ["annotations[1] (id 9)", "key 'bbox' is missing"]),
    ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}, ["key 'bbox' is [1, 2, 3]"]),
    ({"id": 9, "image_id": 4, "category_id": 1, "bbox": [1, 2, 3, 4]}, ["unknown image id", "'image_id' = 4"]),
    ({"id": 9, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]}, ["'category_id' = 2 is not in 'categories'"]),
    ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 4]}, ["box of zero or negative size"]),
    ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [30, 2, 15, 4]}, ["box outside the image", "40x30"]),
])
def test_bad_coco_annotation_names_index_id_and_key(tmp_path, ann, words):
    good = {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}
    coco_dir(tmp_path, annotations=[good, ann])
    raises_at(lambda: read_coco(tmp_path), "instances_train.json", None, "annotations[1] (id 9)", *words)
    data = read_coco(tmp_path, on_bad_label="skip")
    assert data.splits["train"][0].labels.numel() == 1 and len(data.problems) == 1


def test_bad_coco_files(tmp_path):
    coco_dir(tmp_path / "a", drop="categories")
    raises_at(lambda: read_coco(tmp_path / "a"), "instances_train.json", None, "top-level key 'categories'")
    coco_dir(tmp_path / "b", images=[{"id": 1, "file_name": "a.png"}, {"file_name": "b.png"}])
    raises_at(lambda: read_coco(tmp_path / "b"), "instances_train.json", None, "images[1]", "key 'id' is missing")
    coco_dir(tmp_path / "c", images=[{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}])
    raises_at(lambda: read_coco(tmp_path / "c"), "instances_train.json", None, "images[1] (id 2)", "gone.png")
    data = read_coco(tmp_path / "c", on_bad_label="skip")
    assert [(r.width, r.height) for r in data.splits["train"]] == [(40, 30)]  # size from the file header
    f = coco_dir(tmp_path / "d") / "annotations" / "instances_train.json"
    f.write_text(f.read_text().replace('"images": [', '"images": [,'))
    raises_at(lambda: read_coco(tmp_path / "d"), "instances_train.json", 2, "malformed JSON")


def test_coco_crowd_left_out(tmp_path):
    coco_dir(tmp_path, annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
                                    {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    data = read_coco(tmp_path / "annotations" / "instances_train.json")
    assert data.splits["train"][0].labels.tolist() == [0] and "1 crowd" in data.notes[0]


# ---------------------------------------------------------------- bad input: VOC XML

def voc_dir(root: Path, xml: str) -> Path:
    save_image(root / "JPEGImages" / "a.jpg", 40, 30, fmt="JPEG")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "a.xml").write_text(xml)
    return root


VOC_HEAD = "<annotation>\n<size><width>40</width><height>30</height></size>\n"


def test_bad_voc_xml(tmp_path):
    voc_dir(tmp_path / "a", VOC_HEAD + "<object><name>cat</name>\n<bndbox><xmin>1</xmin>\n</annotation>\n")
    raises_at(lambda: read_voc(tmp_path / "a"), "a.xml", 5, "malformed XML", "mismatched tag")
    voc_dir(tmp_path / "b", VOC_HEAD + "<object><name>cat</name>\n<bndbox>\n<xmin>1</xmin>\n<ymin>x</ymin>"
            "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    raises_at(lambda: read_voc(tmp_path / "b"), "a.xml", 6, "<ymin> of object 'cat' is not a number ('x')")
    voc_dir(tmp_path / "c", VOC_HEAD + "<object><name>cat</name>\n<bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>45</xmax><ymax>5</ymax></bndbox></object></annotation>")
    raises_at(lambda: read_voc(tmp_path / "c"), "a.xml", 4, "box outside the image")
    (tmp_path / "c" / "labels.txt").write_text("dog\n")
    raises_at(lambda: read_voc(tmp_path / "c"), "a.xml", 4, "unknown class name", "'cat'")
    (tmp_path / "c" / "JPEGImages" / "a.jpg").unlink()
    raises_at(lambda: read_voc(tmp_path / "c"), "a.xml", None, "label file without image")


def test_voc_one_based_pixels_and_difficult(tmp_path):
    voc_dir(tmp_path, VOC_HEAD + "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>1</xmax>"
            "<ymax>30</ymax></bndbox></object><object><name>dog</name><difficult>1</difficult><bndbox><xmin>1"
            "</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    data = read_voc(tmp_path)
    rec = data.splits["train"][0]
    assert rec.boxes.tolist() == [[0.0, 0.0, 1.0, 30.0]]  # one pixel column wide, the full height
    assert data.names == ["cat"] and "1 objects marked difficult" in data.notes[0]


# ---------------------------------------------------------------- datasets and transforms

def test_exif_rotated_jpeg_size_matches_decoded_pixels(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40 x 20, shown 20 x 40
    save_image(tmp_path / "images" / "train" / "r.jpg", 40, 20, fmt="JPEG", exif=exif)
    save_image(tmp_path / "images" / "val" / "v.jpg", 40, 20, fmt="JPEG")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "r.txt").write_text("0 .5 .5 .5 .5\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a]\n")
    data = load_detection_data(tmp_path)
    image, target = data.train[0]
    assert image.shape == (3, 40, 20) and target["boxes"].tolist() == [[5.0, 10.0, 15.0, 30.0]]


def test_flip_through_dataset_moves_boxes_and_collate(tmp_path):
    make_yolo(tmp_path, {"train": {"a": (100, 80, YOLO_LINE), "b": (100, 80, "0 .5 .5 .2 .2")},
                         "val": {"c": (60, 60, "")}})
    data = load_detection_data(tmp_path / "data.yaml")
    assert data.in_memory and data.problems == [] and "2 train / 1 val" in data.source
    data.train.transform = v2.RandomHorizontalFlip(p=1.0)
    image, target = data.train[0]
    assert isinstance(image, tv_tensors.Image) and isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].tolist() == [[50.0, 20.0, 90.0, 60.0]]  # x -> 100 - x
    assert target["labels"].tolist() == [1] and target["image_id"] == 1  # its id in the COCO file convert writes
    unchanged = torch.tensor([[10.0, 20.0, 50.0, 60.0]], dtype=torch.float64)
    assert torch.allclose(data.train.records[0].boxes, unchanged)  # the dataset is unchanged
    images, targets = detection_collate([data.train[0], data.train[1]])
    assert images.shape == (2, 3, 80, 100) and images.dtype == torch.uint8 and len(targets) == 2
    with pytest.raises(ShapeError):
        detection_collate([data.train[0], data.val[0]])
    lazy = load_detection_data(tmp_path / "data.yaml", cache_bytes=0)
    assert not lazy.in_memory and torch.equal(lazy.train[1][0], data.train[1][0])


def test_dataset_rejects_size_mismatch(tmp_path):
    save_image(tmp_path / "x.png", 10, 10)
    ds = DetectionDataset([DetectionRecord(tmp_path / "x.png", 12, 10, [[0, 0, 5, 5]], [0])])
    with pytest.raises(DataError, match="differs from the labels"):
        ds[0]


# ---------------------------------------------------------------- the scene generator

SMALL = {"n_train": 24, "n_val": 8, "img_size": 128}


def file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory) -> Path:
    return scenes.generate_scenes(tmp_path_factory.mktemp("s") / "scenes", **SMALL)


def test_scenes_are_deterministic(small_scenes, tmp_path):
    again = file_digests(scenes.generate_scenes(tmp_path / "again", **SMALL))
    first = file_digests(small_scenes)
    assert again == first and len(first) == 3 * (24 + 8) + 3
    other = file_digests(scenes.generate_scenes(tmp_path / "other", **SMALL, seed=1))
    assert other.keys() == first.keys()
    changed = [k for k in first if k.startswith("images/") and first[k] != other[k]]
    assert len(changed) == 32


def test_scene_boxes_masks_and_item_sizes(small_scenes):
    data = read_yolo(small_scenes)
    coco = read_coco(small_scenes)
    assert_same_records(data, coco)  # the YOLO and COCO files say the same
    assert data.names[0] == "T-shirt/top" and len(data.names) == 10
    sides, counts = [], []
    for split, recs in data.splits.items():
        for rec in recs:
            mask = np.asarray(Image.open(small_scenes / "masks" / split / (rec.image_path.stem + ".png")))
            assert mask.shape == (128, 128) and (rec.width, rec.height) == (128, 128)
            assert set(np.unique(mask)) == {0} | {c + 1 for c in rec.labels.tolist()}
            counts.append(len(rec.labels))
            for (x1, y1, x2, y2), c in zip(rec.boxes.round().long().tolist(), rec.labels.tolist()):
                assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
                region = mask[y1:y2, x1:x2]
                # the box is tight around its item's mask: the class touches all four edges
                assert (region[0] == c + 1).any() and (region[-1] == c + 1).any()
                assert (region[:, 0] == c + 1).any() and (region[:, -1] == c + 1).any()
                sides.append(max(x2 - x1, y2 - y1))
    assert min(counts) >= 1 and max(counts) <= 4 and max(counts) >= 3
    assert max(sides) <= 112 and min(sides) <= 40 and max(sides) >= 80


def test_load_detection_data_on_scenes(small_scenes):
    data = load_detection_data(small_scenes / "data.yaml")
    assert (len(data.train), len(data.val)) == (24, 8) and data.in_memory
    image, target = data.val[3]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    assert tuple(target["boxes"].canvas_size) == (128, 128) and target["boxes"].dtype == torch.float32
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY and target["labels"].dtype == torch.int64


def test_scenes_builtin_is_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    root = scenes.ensure_scenes(n_train=4, n_val=2, img_size=64)
    assert root.parent == tmp_path and root.name.startswith("scenes-v1-")
    stamp = (root / "data.yaml").stat().st_mtime_ns
    assert scenes.ensure_scenes(n_train=4, n_val=2, img_size=64) == root
    assert (root / "data.yaml").stat().st_mtime_ns == stamp
    assert scenes.scenes_dir() != root and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match="n_train"):
        scenes.generate_scenes(tmp_path / "x", n_train=2.5)


def test_scene_settings_shape_each_scene(tmp_path):
    one = scenes.SceneSettings(min_items=1, max_items=1)
    root = scenes.generate_scenes(tmp_path / "one", n_train=3, n_val=2, img_size=64, seed=0, settings=one)
    data = read_yolo(root)
    assert [len(r.labels) for recs in data.splits.values() for r in recs] == [1] * 5
    with pytest.raises(UsageError, match="min_items <= max_items"):
        scenes.generate_scenes(tmp_path / "bad", n_train=2, settings=scenes.SceneSettings(min_items=3, max_items=2))
    with pytest.raises(UsageError, match="SceneSettings"):
        scenes.generate_scenes(tmp_path / "bad", n_train=2, settings={"max_items": 1})


@pytest.mark.slow
def test_builtin_scenes_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    data = load_detection_data("scenes")
    assert (len(data.train), len(data.val)) == (4000, 300) and data.train[0][0].shape == (3, 160, 160)


def test_every_module_of_the_formats_package_registers_its_format():
    """`cnnkit.data.formats` imports each module of its package, and each registers itself: a new format is
    one new file there."""
    import pkgutil

    import cnnkit.data.formats as formats

    modules = {m.name for m in pkgutil.iter_modules(formats.__path__)} - {"common"}
    registered = {fmt.read.__module__.rsplit(".", 1)[-1] for fmt in formats.FORMATS.values()}
    assert modules == registered == {"coco", "voc", "yolo"}


def test_a_registered_format_is_detected_read_and_written_by_name(tmp_path, monkeypatch, capsys):
    from cnnkit.cli import main
    from cnnkit.data.formats import FORMATS
    from cnnkit.data.formats.common import DetectionFormat, register_format

    seen = []

    def read_boxes(src, *, on_bad_label="error"):  # a format of its own: here, YOLO files named *.boxes
        seen.append(src)
        return read_yolo(Path(src).parent, on_bad_label=on_bad_label)

    monkeypatch.setitem(FORMATS, "boxes", DetectionFormat("boxes", read_boxes, write_yolo, file_suffixes=(".boxes",)))
    with pytest.raises(ValueError, match="already registered"):
        register_format(DetectionFormat("boxes", read_yolo, write_yolo))
    src = tmp_path / "src"
    write_yolo(random_splits(tmp_path / "raw"), src)
    marker = src / "data.boxes"
    marker.write_text("")
    assert detect_format(marker) == "boxes"
    assert read_any(marker).describe() == read_any(src).describe() and seen == [marker]
    assert main(["data", "convert", str(src), str(tmp_path / "out"), "--to", "boxes"]) == 0
    assert (tmp_path / "out" / "data.yaml").is_file()
