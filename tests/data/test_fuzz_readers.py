"""Fuzzing every dataset reader and writer with hypothesis (issue #8).

The invariant, for any input: the reader returns a valid sample (or dataset) or raises a
`CnnkitError` with a one-line message; never another exception, never a hang (each call runs under
a SIGALRM guard). Paths that escape the dataset root (COCO `file_name`, VOC `<filename>` and ids,
YAML `train` / `val` / masks, YOLO image lists) are refused with a CnnkitError.

The default profile keeps every test file under 30 s on a shared 2-core machine; the `slow` test
at the end reruns the whole set with many more examples (`pytest -m slow`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data.classification import load_classification_data
from cnnkit.data.config import read_data_yaml
from cnnkit.data.formats import DetectionRecord, DetectionSplits, read_any, read_coco, read_voc, read_yolo
from cnnkit.data.formats.coco import write_coco
from cnnkit.data.formats.voc import write_voc
from cnnkit.data.formats.yolo import write_yolo
from cnnkit.data.idx import read_idx
from cnnkit.data.images import decode_image, decode_many, read_image_size
from cnnkit.data.segmentation import decode_mask, load_segmentation_data
from cnnkit.errors import CnnkitError

FUZZ = settings(max_examples=int(os.environ.get("CNNKIT_FUZZ_EXAMPLES", "50")), deadline=None,
                derandomize=not os.environ.get("CNNKIT_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TIME_LIMIT = 20.0  # seconds per reader call; a hang fails the test instead of blocking the suite


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT):
    def on_alarm(signum, frame):
        raise Hang(f"reader still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn, *args, allow_breaks: bool = False, **kwargs):
    """fn's result, or the CnnkitError it raised (checked to have a message); anything else fails.

    A message may hold a line break only inside a value it quotes (a file or folder name from the
    YAML can hold one); the CLI joins every message into one line (tests/test_cli_errors.py)."""
    with time_limit():
        try:
            return fn(*args, **kwargs)
        except CnnkitError as exc:
            text = str(exc)
            assert text.strip() and exc.reason.strip(), "empty error message"
            assert allow_breaks or ("\n" not in text and "\r" not in text), f"multi-line error: {text!r}"
            return exc


# ---------------------------------------------------------------- strategies

# file and folder names: unicode, spaces, dots (never '/', NUL, or a name the OS refuses)
name_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                    min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
weird_numbers = st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "1e-320", "0", "-0", "-1", "0.5",
                                 "1", "2", "99999999999999999999", "0x10", "1_0", "", "١", "½", "+.5", "5."])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                         st.sampled_from(["../../etc/passwd", "/etc/passwd", "a b/ü.png", "x" * 300, "nul\0x"]))


def json_values(depth: int = 2):
    return st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=8)


def png_bytes(w: int, h: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode in ("I;16",):
        arr = rng.integers(0, 65535, (h, w)).astype(np.uint16)
        img = Image.fromarray(arr)
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@st.composite
def image_files(draw):
    """(bytes, suffix): random bytes, or a real PNG / JPEG truncated and with bytes overwritten."""
    kind = draw(st.sampled_from(["random", "png", "jpeg", "png-header"]))
    suffix = draw(st.sampled_from([".png", ".jpg", ".jpeg", ".PNG", ".bmp", ".webp"]))
    if kind == "random":
        return draw(st.binary(max_size=300)), suffix
    if kind == "png-header":  # a PNG signature and an IHDR with random width / height, nothing else valid
        w, h = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
        ihdr = struct.pack(">IIBBBBB", w, h, 8, draw(st.sampled_from([0, 2, 3, 4, 6, 9])), 0, 0, 0)
        chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + chunk + draw(st.binary(max_size=40)), suffix
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mode = draw(st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "1", "I;16"]))
    data = bytearray(png_bytes(w, h, mode) if kind == "png" else jpeg_bytes(w, h))
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        data = data[:cut]
    for pos, value in draw(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6)):
        if data:
            data[pos % len(data)] = value
    return bytes(data), suffix


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def check_image_tensor(t):
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    assert t.shape[1] >= 1 and t.shape[2] >= 1


def check_splits(splits: DetectionSplits):
    """Every record the readers return is usable: finite boxes inside the image, labels in range."""
    assert isinstance(splits, DetectionSplits)
    n = len(splits.names)
    assert n >= 1 and all(isinstance(name, str) for name in splits.names)
    for records in splits.splits.values():
        for rec in records:
            assert rec.width >= 1 and rec.height >= 1
            assert rec.image_path.is_file()
            if splits.root is not None:
                root = splits.root if splits.root.is_dir() else splits.root.parent
                assert os.path.realpath(rec.image_path).startswith(os.path.realpath(root) + os.sep)
            b = rec.boxes
            assert torch.isfinite(b).all()
            if len(b):
                assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
                assert (b[:, :2] >= 0).all() and (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
                assert int(rec.labels.min()) >= 0 and int(rec.labels.max()) < n


# ---------------------------------------------------------------- images and masks

@FUZZ
@given(image_files(), name_text)
def test_fuzz_image_decoding(file, name):
    data, suffix = file
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "sp ace ü" / f"{name}{suffix}", data)
        got = outcome(decode_image, path)
        if not isinstance(got, CnnkitError):
            check_image_tensor(got)
        size = outcome(read_image_size, path)
        if not isinstance(size, CnnkitError):
            assert len(size) == 2 and min(size) >= 1
        with time_limit():
            many = decode_many([str(path)], progress=False)
        assert len(many.ok) == 1 and (many.ok[0] or many.bad[0][0] == str(path))


@FUZZ
@given(image_files(), st.one_of(st.none(), st.integers(1, 300)), st.sampled_from([255, 0, 3, 65535]))
def test_fuzz_mask_decoding(file, num_classes, ignore):
    data, _ = file
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "m ask.png", data)
        got = outcome(decode_mask, path, num_classes, ignore)
        if not isinstance(got, CnnkitError):
            assert got.dtype == torch.int64 and got.ndim == 2
            ok = (got >= 0) | (got == ignore)
            if num_classes is not None:
                ok &= (got < num_classes) | (got == ignore)
            assert ok.all()


MASK_MODES = ["1", "L", "P", "I", "I;16", "F", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"]


@FUZZ
@given(st.sampled_from(MASK_MODES), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1),
       st.integers(1, 30))
def test_fuzz_masks_of_every_mode(mode, w, h, seed, num_classes):
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 40, (h, w)).astype(np.uint8)
    if mode in ("1", "L", "P"):
        img = Image.fromarray(grey, "L").convert(mode)
    elif mode in ("I", "I;16", "F"):
        img = Image.fromarray(grey.astype(np.int32)) if mode == "I" else \
            Image.fromarray(grey.astype(np.uint16)) if mode == "I;16" else Image.fromarray(grey.astype(np.float32))
    else:
        img = Image.fromarray(np.stack([grey] * 3, -1), "RGB").convert(mode)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("mask.tif" if mode in ("F", "CMYK", "YCbCr", "HSV", "LAB", "PA", "I") else "mask.png")
        try:
            img.save(path)
        except (OSError, ValueError, KeyError):  # Pillow cannot write this mode in this format
            return
        got = outcome(decode_mask, path, num_classes)
        if not isinstance(got, CnnkitError):
            assert got.shape == (h, w) and (((got >= 0) & (got < num_classes)) | (got == 255)).all()


# ---------------------------------------------------------------- YOLO txt and data YAML

label_lines = st.lists(st.lists(weird_numbers | st.text(max_size=6), min_size=0, max_size=9).map(" ".join),
                       max_size=6).map("\n".join)


@FUZZ
@given(st.one_of(label_lines, st.binary(max_size=200)), st.sampled_from(["error", "skip"]), name_text)
def test_fuzz_yolo_label_lines(labels, mode, stem):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d s"
        write(root / "images" / "train" / f"{stem}.png", png_bytes(16, 12))
        write(root / "labels" / "train" / f"{stem}.txt", labels)
        write(root / "data.yaml", "train: images/train\nnames: [a, b, c]\n")
        got = outcome(read_yolo, root, on_bad_label=mode)
        if isinstance(got, CnnkitError):
            assert mode == "error"
        else:
            check_splits(got)


yaml_keys = st.sampled_from(["path", "train", "val", "test", "names", "nc", "train_masks", "val_masks",
                             "ignore_index", "extra"])
yaml_values = st.one_of(json_values(), st.sampled_from(["images/train", "images/val", ".", "..", "../..", "/",
                                                        "/etc", "~", "images/../../x", "a\0b", "x" * 400]))


@st.composite
def data_yamls(draw):
    """A data YAML text: a random mapping (keys missing, wrong types, odd paths) or random text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=80))
    doc = draw(st.dictionaries(yaml_keys, yaml_values, max_size=6))
    if isinstance(doc.get("path"), str) and doc["path"].startswith(("/", "~", "../..")):
        # `path` is the root the YAML declares (ultralytics' convention allows ../datasets/x), so it
        # is not confined; walking / or ~ would only make the test slow. The root "/" itself is
        # refused: test_yaml_path_filesystem_root_is_refused.
        doc["path"] = draw(st.sampled_from([".", "..", "sub", "~nosuchuser0"]))
    if draw(st.booleans()):
        doc.setdefault("train", "images/train")
        doc.setdefault("names", ["a", "b"])
    return yaml.safe_dump(doc, allow_unicode=True)


def make_detection_tree(root: Path) -> None:
    for split in ("train", "val"):
        write(root / "images" / split / "x y.png", png_bytes(10, 8))
        write(root / "labels" / split / "x y.txt", "0 0.5 0.5 0.5 0.5\n")
        mask = io.BytesIO()
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(mask, format="PNG")
        write(root / "masks" / split / "x y.png", mask.getvalue())
    for split in ("train", "val"):  # classification: class folders
        write(root / split / "a" / "1.png", png_bytes(8, 8))
        write(root / split / "b" / "1.png", png_bytes(8, 8, seed=1))


def _safe_yaml(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


@FUZZ
@given(data_yamls())
def test_fuzz_data_yaml_every_reader(text):
    doc = _safe_yaml(text)  # an error may quote a value of the file, line breaks and all
    breaks = isinstance(doc, dict) and any(c in str(x) for kv in doc.items() for x in kv for c in "\r\n\x0b\x0c")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds ü"
        make_detection_tree(root)
        file = write(root / "data.yaml", text)
        got = outcome(read_data_yaml, file, allow_breaks=breaks)
        if not isinstance(got, CnnkitError):
            for folder in (got.train, got.val, got.test):
                assert folder is None or os.path.realpath(folder).startswith(os.path.realpath(got.root))
        got = outcome(read_yolo, file, on_bad_label="skip", allow_breaks=breaks)
        if not isinstance(got, CnnkitError):
            check_splits(got)
        got = outcome(load_classification_data, file, on_bad_image="skip", allow_breaks=breaks)
        if not isinstance(got, CnnkitError):
            assert len(got.names) >= 1 and len(got.train) >= 1
            image, label = got.train[0]
            assert 0 <= label < len(got.names)
        got = outcome(load_segmentation_data, file, allow_breaks=breaks)
        if not isinstance(got, CnnkitError):
            image, mask = got.train[0]
            assert tuple(mask.shape) == tuple(image.shape[1:])


@pytest.mark.parametrize("key, value", [
    ("train", "../outside"), ("train", "../../"), ("val", "images/../../outside"),
    ("train", "ABS/outside"), ("test", "ABS/outside"),
])
def test_yaml_folders_outside_the_root_are_refused(tmp_path, key, value):
    root = tmp_path / "ds"
    make_detection_tree(root)
    make_detection_tree(tmp_path / "outside")
    value = value.replace("ABS", str(tmp_path))
    doc = {"train": "images/train", "val": "images/val", "names": ["a", "b"], key: value}
    file = write(root / "data.yaml", yaml.safe_dump(doc))
    for reader in (read_data_yaml, read_yolo, load_classification_data, load_segmentation_data):
        with pytest.raises(CnnkitError, match="outside"):
            reader(file)


def test_yaml_masks_and_image_lists_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "ds"
    make_detection_tree(root)
    make_detection_tree(tmp_path / "outside")
    file = write(root / "data.yaml", "train: images/train\nnames: [a, b]\ntrain_masks: ../outside/masks/train\n")
    with pytest.raises(CnnkitError, match="outside"):
        load_segmentation_data(file)
    write(root / "train.txt", f"images/train/x y.png\n{tmp_path}/outside/images/train/x y.png\n")
    file = write(root / "data.yaml", "train: train.txt\nnames: [a, b]\n")
    with pytest.raises(CnnkitError, match="outside") as info:
        read_yolo(file)
    assert "train.txt:2" in str(info.value)
    write(root / "train.txt", "images/train/x y.png\n../outside/images/train/x y.png\n")
    with pytest.raises(CnnkitError, match="outside"):
        read_yolo(file)
    write(root / "train.txt", "images/train/x y.png\n")
    assert len(read_yolo(file).splits["train"]) == 1


@pytest.mark.parametrize("path", ["/", "/../..", "ROOT"])
def test_yaml_path_filesystem_root_is_refused(tmp_path, path):
    make_detection_tree(tmp_path / "ds")
    up = os.path.relpath("/", tmp_path / "ds")
    file = write(tmp_path / "ds" / "data.yaml", f"path: {path.replace('ROOT', up)}\ntrain: .\nnames: [a, b]\n")
    for reader in (read_data_yaml, read_yolo, load_classification_data, load_segmentation_data):
        with pytest.raises(CnnkitError, match="file-system root"):
            with time_limit(10):
                reader(file)


def test_yaml_path_key_keeps_the_ultralytics_convention(tmp_path):
    """`path` itself is the root the user declares (ultralytics writes path: ../datasets/coco8), so it
    may lie beside the YAML; only the folders under it are confined to it."""
    make_detection_tree(tmp_path / "datasets" / "d")
    file = write(tmp_path / "cfg" / "d.yaml", "path: ../datasets/d\ntrain: images/train\nval: images/val\n"
                 "names: [a, b]\n")
    assert len(read_yolo(file).splits["train"]) == 1
    file = write(tmp_path / "cfg" / "e.yaml", "path: ../datasets/d\ntrain: ../../cfg\nnames: [a, b]\n")
    with pytest.raises(CnnkitError, match="outside"):
        read_yolo(file)


# ---------------------------------------------------------------- COCO JSON

@st.composite
def coco_documents(draw):
    """A COCO file: a well-formed skeleton with random entries, keys dropped or of the wrong type,
    or any JSON value at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values())
    number = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([10**30, -10**30, 1e308]), json_scalars)
    images = [{"id": draw(st.one_of(st.integers(0, 3), json_scalars)),
               "file_name": draw(st.sampled_from(["a.png", "b c.png", "../../etc/passwd", "/etc/passwd",
                                                  "../a.png", "missing.png", "sub/../a.png", "x" * 300]) | json_scalars),
               "width": draw(number), "height": draw(number)} for _ in range(draw(st.integers(0, 3)))]
    anns = [{"id": k, "image_id": draw(st.one_of(st.integers(0, 3), json_scalars)),
             "category_id": draw(st.one_of(st.integers(0, 3), json_scalars)),
             "bbox": draw(st.one_of(st.lists(number, min_size=0, max_size=5), json_scalars)),
             "iscrowd": draw(st.one_of(st.just(0), json_scalars))} for k in range(draw(st.integers(0, 4)))]
    cats = [{"id": draw(st.one_of(st.integers(0, 3), json_scalars)), "name": draw(st.text(max_size=5) | json_scalars)}
            for _ in range(draw(st.integers(0, 3)))]
    doc = {"images": images, "annotations": anns, "categories": cats}
    for key in draw(st.lists(st.sampled_from(list(doc)), max_size=2)):
        doc[key] = draw(json_scalars) if draw(st.booleans()) else doc.pop(key) and None
    for entry in draw(st.lists(st.sampled_from(images + anns + cats), max_size=2)) if images + anns + cats else []:
        entry.pop(draw(st.sampled_from(sorted(entry))), None)
    return doc


def dump_json(doc) -> str:
    return json.dumps(doc, allow_nan=True)


@FUZZ
@given(coco_documents(), st.sampled_from(["error", "skip"]))
def test_fuzz_coco_json(doc, mode):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "co co"
        write(root / "images" / "train" / "a.png", png_bytes(20, 10))
        write(root / "images" / "train" / "b c.png", b"not a png")
        write(root / "annotations" / "instances_train.json", dump_json(doc))
        got = outcome(read_coco, root, on_bad_label=mode)
        if not isinstance(got, CnnkitError):
            check_splits(got)
        got = outcome(read_any, root / "annotations" / "instances_train.json", on_bad_label=mode)
        if not isinstance(got, CnnkitError):
            check_splits(got)


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd", "../../../../../../etc/hostname",
                                       "sub/../../../outside.png", "../outside.png"])
def test_coco_file_name_outside_the_root_is_refused(tmp_path, file_name):
    root = tmp_path / "ds"
    write(root / "images" / "train" / "a.png", png_bytes(20, 10))
    write(tmp_path / "outside.png", png_bytes(20, 10))
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
                      {"id": 2, "file_name": file_name, "width": 20, "height": 10}],
           "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "x"}]}
    write(root / "annotations" / "instances_train.json", json.dumps(doc))
    with pytest.raises(CnnkitError, match="outside"):
        read_coco(root)
    skipped = read_coco(root, on_bad_label="skip")  # skip mode leaves it out and says so
    assert [r.image_path.name for r in skipped.splits["train"]] == ["a.png"]
    assert any("outside" in reason for _, _, reason in skipped.problems)


# ---------------------------------------------------------------- Pascal VOC XML

@st.composite
def voc_documents(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    value = st.one_of(weird_numbers, st.text(max_size=6))
    filename = draw(st.sampled_from(["a.png", "../../etc/passwd", "/etc/passwd", "", "zz.png", "x" * 300]))
    objs = []
    for _ in range(draw(st.integers(0, 3))):
        parts = {k: draw(value) for k in ("xmin", "ymin", "xmax", "ymax")}
        keep = draw(st.lists(st.sampled_from(sorted(parts)), unique=True, min_size=2, max_size=4))
        box = "".join(f"<{k}>{parts[k]}</{k}>" for k in keep)
        name = draw(st.sampled_from(["cat", "dog", "", "ü x"]))
        objs.append(f"<object><name>{name}</name><difficult>{draw(value)}</difficult><bndbox>{box}</bndbox></object>")
    size = f"<size><width>{draw(value)}</width><height>{draw(value)}</height></size>" if draw(st.booleans()) else ""
    text = f"<annotation><filename>{filename}</filename>{size}{''.join(objs)}</annotation>"
    if draw(st.booleans()):
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(voc_documents(), st.sampled_from(["error", "skip"]),
       st.one_of(st.none(), st.lists(st.sampled_from(["a", "../../x", "/etc/passwd", "b", "a\u00e9"]), max_size=3)))
def test_fuzz_voc_xml(xml, mode, split_ids):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vo c"
        write(root / "JPEGImages" / "a.png", png_bytes(20, 10))
        write(root / "Annotations" / "a.xml", xml)
        if split_ids is not None:
            write(root / "ImageSets" / "Main" / "train.txt", "\n".join(split_ids))
        got = outcome(read_voc, root, on_bad_label=mode)
        if not isinstance(got, CnnkitError):
            check_splits(got)


def test_voc_filename_and_ids_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "voc"
    write(tmp_path / "secret.png", png_bytes(20, 10))
    write(root / "Annotations" / "a.xml", "<annotation><filename>../../secret.png</filename><object><name>x</name>"
          "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    with pytest.raises(CnnkitError, match="outside"):
        read_voc(root)
    write(tmp_path / "evil.xml", "<annotation><filename>a.png</filename></annotation>")
    write(root / "ImageSets" / "Main" / "train.txt", "../../evil\n")
    with pytest.raises(CnnkitError, match="outside"):
        read_voc(root)


# ---------------------------------------------------------------- segmentation folders, IDX

@FUZZ
@given(st.lists(image_files(), min_size=1, max_size=2), st.lists(image_files(), min_size=1, max_size=2),
       st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=30)))
def test_fuzz_segmentation_folder(images, masks, classes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "se g"
        for i, (data, suffix) in enumerate(images):
            write(root / "images" / f"{i}{suffix}", data)
        for i, (data, _) in enumerate(masks):
            write(root / "masks" / f"{i}.png", data)
        if classes is not None:
            write(root / "classes.txt", classes)
        got = outcome(load_segmentation_data, root)
        if not isinstance(got, CnnkitError):
            for ds in (got.train, got.val):
                for k in range(len(ds)):
                    image, mask = outcome(ds.__getitem__, k)
                    assert tuple(mask.shape) == tuple(image.shape[1:])
                    assert (((mask >= 0) & (mask < got.num_classes)) | (mask == got.ignore_index)).all()


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(["images", "labels"]),
       st.lists(st.integers(0, 2**32 - 1), max_size=3))
def test_fuzz_idx_files(tail, kind, dims):
    magic = bytes([0, 0, 8, 3 if kind == "images" else 1])
    with tempfile.TemporaryDirectory() as tmp:
        data = magic + b"".join(struct.pack(">I", d) for d in dims) + tail
        for name, blob in (("x-idx.bin", data), ("y.gz", data), ("z.gz", zlib.compress(data))):
            got = outcome(read_idx, write(Path(tmp) / name, blob), kind)
            if not isinstance(got, CnnkitError):
                assert got.ndim == (3 if kind == "images" else 1)


# ---------------------------------------------------------------- writers: write, read back, compare

name_chars = st.characters(blacklist_categories=("Cs",))
class_names = st.lists(st.text(name_chars, min_size=1, max_size=8), min_size=1, max_size=4, unique=True)


@st.composite
def detection_splits(draw, folder: Path):
    names = draw(class_names)
    splits = {}
    for split in draw(st.lists(st.sampled_from(["train", "val", "test"]), min_size=1, max_size=2, unique=True)):
        records = []
        for k in range(draw(st.integers(1, 2))):
            w, h = draw(st.integers(4, 40)), draw(st.integers(4, 40))
            path = write(folder / split / f"{draw(name_text)}{k}.png", png_bytes(w, h))
            boxes, labels = [], []
            for _ in range(draw(st.integers(0, 3))):
                x1, y1 = draw(st.floats(0, w - 2)), draw(st.floats(0, h - 2))
                x2, y2 = draw(st.floats(x1 + 1, w)), draw(st.floats(y1 + 1, h))
                boxes.append((x1, y1, x2, y2))
                labels.append(draw(st.integers(0, len(names) - 1)))
            records.append(DetectionRecord(path, w, h, boxes, labels))
        splits[split] = records
    return DetectionSplits(names=names, splits=splits)


@FUZZ
@given(st.data(), st.sampled_from(["yolo", "coco", "voc"]))
def test_fuzz_writers_round_trip(data, fmt):
    writers = {"yolo": write_yolo, "coco": write_coco, "voc": write_voc}
    readers = {"yolo": read_yolo, "coco": read_coco, "voc": read_voc}
    with tempfile.TemporaryDirectory() as tmp:
        splits = data.draw(detection_splits(Path(tmp) / "src"))
        dst = Path(tmp) / "out put"
        written = outcome(writers[fmt], splits, dst)
        if isinstance(written, CnnkitError):  # a name the format cannot hold: refused before writing
            assert "name" in str(written) and not dst.exists()
            return
        back = outcome(readers[fmt], dst)
        assert not isinstance(back, CnnkitError), back
        check_splits(back)
        assert back.names == splits.names
        assert sorted(back.splits) == sorted(splits.splits)
        for split, recs in splits.splits.items():
            got = sorted(back.splits[split], key=lambda r: (r.width, r.height, len(r.labels)))
            want = sorted(recs, key=lambda r: (r.width, r.height, len(r.labels)))
            for a, b in zip(got, want):
                assert (a.width, a.height) == (b.width, b.height)
                assert sorted(a.labels.tolist()) == sorted(b.labels.tolist())
                ka = sorted(map(tuple, a.boxes.tolist()), key=lambda t: [round(v, 2) for v in t])
                kb = sorted(map(tuple, b.boxes.tolist()), key=lambda t: [round(v, 2) for v in t])
                assert all(math.isclose(u, v, abs_tol=1e-3) for p, q in zip(ka, kb) for u, v in zip(p, q))


# ---------------------------------------------------------------- the long profile

@pytest.mark.slow
def test_fuzz_long_profile():
    """Every fuzz test above with 20x the examples and fresh random seeds, in a child pytest."""
    import subprocess
    import sys

    env = dict(os.environ, CNNKIT_FUZZ_EXAMPLES="500", CNNKIT_FUZZ_RANDOM="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "fuzz and not long_profile"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
