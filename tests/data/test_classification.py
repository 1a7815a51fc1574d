"""Classification data: built-in Fashion-MNIST, image folders, data YAML, IDX files, bad input."""

from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import ClassificationData, load_classification_data
from cnnkit.data import builtin, imagefolder
from cnnkit.data.images import decode_image
from cnnkit.errors import CnnkitError, DataError, UsageError

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers

def rgb_image(value: int, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, (value, 255 - value, 7))


def make_class_tree(root: Path, classes: dict[str, int], ext: str = "png", start: int = 0) -> None:
    """root/<class>/<i>.<ext>, `classes[name]` images per class, each a different solid colour."""
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rgb_image((start + 10 * c + i) % 256).save(folder / f"{i:03d}.{ext}")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def items(dataset) -> list[tuple[torch.Tensor, int]]:
    return [dataset[i] for i in range(len(dataset))]


# ---------------------------------------------------------------- built-in Fashion-MNIST

@pytest.fixture(scope="module")
def embedded() -> ClassificationData:
    return load_classification_data("fashion-mnist")


def test_embedded_fashion_mnist_sizes_and_types(embedded):
    assert (len(embedded.train), len(embedded.val)) == (8000, 2000)
    assert embedded.names[0] == "T-shirt/top" and embedded.names[9] == "Ankle boot"
    assert len(embedded.names) == 10 and embedded.channels == 1
    assert embedded.source == "fashion-mnist (embedded, 8000 train / 2000 val)"
    image, label = embedded.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and isinstance(label, int)
    assert Counter(embedded.val.labels.tolist()) == {c: 200 for c in range(10)}
    assert Counter(embedded.train.labels.tolist()) == {c: 800 for c in range(10)}


def test_embedded_split_is_deterministic_and_disjoint(embedded):
    again = load_classification_data("fashion-mnist")
    assert torch.equal(again.train.images, embedded.train.images)
    assert torch.equal(again.val.labels, embedded.val.labels)
    train_rows = {bytes(x.flatten().numpy()) for x in embedded.train.images[:500]}
    assert not any(bytes(x.flatten().numpy()) in train_rows for x in embedded.val.images)


def test_transform_is_applied_and_dataset_unchanged(embedded):
    before = embedded.train[3][0].clone()
    embedded.train.transform = lambda x: x.zero_()  # even an in-place transform leaves the data alone
    try:
        assert embedded.train[3][0].sum() == 0
    finally:
        embedded.train.transform = None
    assert torch.equal(embedded.train[3][0], before)


@pytest.mark.parametrize("transform", ["none", "pad", "resize", "random"])
def test_a_whole_batch_read_at_once_equals_the_images_read_one_by_one(transform):
    """`TensorImageDataset.__getitems__` (what the DataLoader calls): the same items as `__getitem__`,
    through a Subset too, with the transform on the batch only where it is `batchable`."""
    from torch.utils.data import DataLoader, Subset

    from cnnkit.tasks.classify import FitTo

    g = torch.Generator().manual_seed(0)
    ds = builtin.TensorImageDataset(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g),
                                    torch.arange(40) % 7)
    calls = []

    def random_flip(img):  # per image, random: must be applied image by image
        calls.append(img.shape)
        return img.flip(-1) if torch.rand(()) < 0.5 else img

    ds.transform = {"none": None, "pad": FitTo(32), "resize": FitTo(16), "random": random_flip}[transform]
    picked = [5, 0, 39, 5, 17]
    torch.manual_seed(1)
    batch = ds.__getitems__(picked)
    torch.manual_seed(1)
    one_by_one = [ds[i] for i in picked]
    assert [label for _, label in batch] == [label for _, label in one_by_one]
    assert all(type(label) is int for _, label in batch)
    for (a, _), (b, _) in zip(batch, one_by_one):
        assert torch.equal(a, b)
    if transform == "random":
        assert calls and all(len(c) == 3 for c in calls)
    if transform != "random":
        sub = Subset(ds, [3, 8, 9])
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(sub.__getitems__([2, 0]), [ds[9], ds[3]]))
        before = ds.images.clone()
        x, y = next(iter(DataLoader(ds, batch_size=8)))
        assert torch.equal(x, torch.stack([ds[i][0] for i in range(8)])) and torch.equal(y, torch.arange(8) % 7)
        assert torch.equal(ds.images, before)


@pytest.mark.skipif(not (FASHION_SYSTEM / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_full(monkeypatch, tmp_path):
    monkeypatch.delenv("CNNKIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    data = load_classification_data("fashion-mnist-full")
    assert (len(data.train), len(data.val)) == (60000, 10000)
    assert data.train.images.shape == (60000, 1, 28, 28) and data.channels == 1
    assert str(FASHION_SYSTEM) in data.source


def test_fashion_mnist_full_missing_says_where(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "SYSTEM_FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_classification_data("fashion-mnist-full")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message


def test_fashion_mnist_full_from_cnnkit_data(monkeypatch, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), gz=True)
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    data = load_classification_data("fashion-mnist-full")
    assert (len(data.train), len(data.val)) == (30, 10) and data.names == builtin.FASHION_MNIST_NAMES


# ---------------------------------------------------------------- IDX

def test_idx_round_trip_gz_and_plain(tmp_path):
    rng = np.random.default_rng(1)
    train_x, test_x = rng.integers(0, 256, (20, 5, 7)), rng.integers(0, 256, (6, 5, 7))
    train_y, test_y = np.arange(20) % 4, np.array([3, 2, 1, 0, 1, 2])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y)
    data = load_classification_data(tmp_path)
    assert data.channels == 1 and data.names == [str(d) for d in range(10)]
    assert (len(data.train), len(data.val)) == (20, 6)
    image, label = data.train[5]
    assert image.shape == (1, 5, 7) and image.dtype == torch.uint8
    assert np.array_equal(image[0].numpy(), train_x[5]) and label == 1
    assert np.array_equal(data.val.images[:, 0].numpy(), test_x) and data.val.labels.tolist() == test_y.tolist()


def test_idx_without_t10k_is_split(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((50, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(50) % 2)
    data = load_classification_data(tmp_path)
    assert (len(data.train), len(data.val)) == (40, 10) and "80/20" in data.source


@pytest.mark.parametrize("damage, expected", [
    ("magic", "wrong magic number"),
    ("truncate", "truncated IDX file"),
    ("gzip", "corrupt or truncated gzip"),
])
def test_idx_bad_files(tmp_path, damage, expected):
    images = tmp_path / ("train-images-idx3-ubyte.gz" if damage == "gzip" else "train-images-idx3-ubyte")
    write_idx(images, np.zeros((10, 4, 4)), gz=damage == "gzip", magic=0x0803 if damage != "magic" else 0x0903)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(10))
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-5])
    if damage == "gzip":
        images.write_bytes(images.read_bytes()[:-9])
    with pytest.raises(DataError) as err:
        load_classification_data(tmp_path)
    assert expected in str(err.value) and str(images) in str(err.value)


def test_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 4, 4)))
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(9))
    with pytest.raises(DataError, match="9 labels for 10 images") as err:
        load_classification_data(tmp_path)
    assert err.value.path == str(labels)


# ---------------------------------------------------------------- decoding

def test_decode_modes(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 3), 77).save(grey)
    assert decode_image(grey).shape == (3, 3, 4) and decode_image(grey).unique().tolist() == [77]

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))      # fully transparent -> white
    rgba.putpixel((1, 0), (100, 50, 0, 255))    # opaque -> unchanged
    rgba.save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png")
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 0, 1].tolist() == [100, 50, 0]

    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    half.save(tmp_path / "half.png")
    assert decode_image(tmp_path / "half.png")[:, 0, 0].tolist() == [127, 127, 127]

    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert decode_image(tmp_path / "palette.png")[:, 1, 1].tolist() == [200, 100, 50]

    sixteen = Image.fromarray(np.array([[51400, 65535], [0, 1000]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "sixteen.png")
    out = decode_image(tmp_path / "sixteen.png")
    assert out[0].tolist() == [[200, 255], [0, 4]] and torch.equal(out[0], out[2])

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    red = decode_image(tmp_path / "cmyk.jpg")[:, 0, 0]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rgb_image(90, size=(40, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_image(tmp_path / "rotated.jpg").shape == (3, 40, 20)


def test_truncated_image_names_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError) as err:
        decode_image(path)
    assert str(path) in str(err.value) and "on_bad_image='skip'" in str(err.value)


# ---------------------------------------------------------------- image folders

def test_folder_train_val_all_formats(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 3), ("valid", 1)):
        make_class_tree(root / split, {"cat": n, "dog": n}, ext="jpg")
    Image.new("L", (8, 6), 30).save(root / "train" / "cat" / "grey.PNG")
    Image.new("RGBA", (8, 6), (1, 2, 3, 255)).save(root / "train" / "dog" / "alpha.webp")
    Image.new("P", (8, 6)).save(root / "train" / "dog" / "pal.bmp")
    (root / "train" / "dog" / "sub").mkdir()
    rgb_image(5).save(root / "train" / "dog" / "sub" / "deep.jpeg")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    data = load_classification_data(root)
    assert data.names == ["cat", "dog"] and data.channels == 3 and data.in_memory
    assert (len(data.train), len(data.val)) == (10, 2)
    assert Counter(data.train.labels.tolist()) == {0: 4, 1: 6}
    assert "train/ + valid/" in data.source
    assert any("ignored 2" in note for note in data.notes)
    for image, _ in items(data.train):
        assert image.dtype == torch.uint8 and image.shape[0] == 3
    grey = data.train.paths.index(str(root / "train" / "cat" / "grey.PNG"))
    assert data.train[grey][0].unique().tolist() == [30]


def test_folder_cached_equals_lazy(tmp_path):
    make_class_tree(tmp_path, {"a": 4, "b": 3})
    cached = load_classification_data(tmp_path)
    lazy = load_classification_data(tmp_path, cache_bytes=0)
    assert cached.in_memory and not lazy.in_memory
    assert lazy.train.paths == cached.train.paths
    for (x, y), (u, v) in zip(items(cached.train), items(lazy.train)):
        assert torch.equal(x, u) and y == v
    assert any("decoded when read" in note for note in lazy.notes)


def test_folder_without_val_is_stratified_and_deterministic(tmp_path):
    make_class_tree(tmp_path, {"a": 10, "b": 5, "c": 1})
    first = load_classification_data(tmp_path)
    second = load_classification_data(tmp_path)
    assert first.val.paths == second.val.paths and first.train.paths == second.train.paths
    assert Counter(first.val.labels.tolist()) == {0: 2, 1: 1}
    assert len(first.train) == 13 and "stratified 80/20 split" in first.source
    assert not set(first.train.paths) & set(first.val.paths)
    # adding an image moves at most one other image between the splits
    rgb_image(200).save(tmp_path / "a" / "new.png")
    third = load_classification_data(tmp_path)
    assert len(set(first.val.paths) ^ (set(third.val.paths) - {str(tmp_path / "a" / "new.png")})) <= 1


def test_skip_mode_counts_and_lists(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 3, "b": 3})
    make_class_tree(tmp_path / "val", {"a": 1, "b": 1})
    broken = tmp_path / "train" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    cut = tmp_path / "val" / "b" / "cut.png"
    Image.effect_noise((32, 32), 40).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        load_classification_data(tmp_path)
    assert str(broken) in str(err.value) and "1 more bad images" in str(err.value)
    data = load_classification_data(tmp_path, on_bad_image="skip")
    assert sorted(p for p, _ in data.skipped) == sorted([str(broken), str(cut)])
    assert all(reason for _, reason in data.skipped)
    assert (len(data.train), len(data.val)) == (6, 2)
    assert str(broken) not in data.train.paths and str(cut) not in data.val.paths


def test_bad_on_bad_image_value(tmp_path):
    with pytest.raises(UsageError):
        load_classification_data(tmp_path, on_bad_image="ignore")


def test_missing_path():
    with pytest.raises(DataError, match="dataset not found") as err:
        load_classification_data("/no/such/dataset")
    assert err.value.path == "/no/such/dataset" and "fashion-mnist" in str(err.value)


def test_builtin_typo_suggests_name():
    with pytest.raises(DataError, match="did you mean fashion-mnist-full"):
        load_classification_data("fashion-mnist-ful")


def test_too_few_images_to_split(tmp_path):
    make_class_tree(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match="too few images to split"):
        load_classification_data(tmp_path)


def test_empty_class_folder_in_train_is_an_error(tmp_path):
    make_class_tree(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="class folder holds no images") as err:
        load_classification_data(tmp_path)
    assert err.value.path == str(tmp_path / "b")


def test_empty_class_folder_in_val_is_noted(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_class_tree(tmp_path / "val", {"a": 1})
    (tmp_path / "val" / "b").mkdir()
    data = load_classification_data(tmp_path)
    assert len(data.val) == 1 and any("no images of class(es) b" in n for n in data.notes)


def test_folder_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as err:
        load_classification_data(tmp_path)
    assert err.value.path == str(tmp_path)


def test_images_outside_class_folders(tmp_path):
    rgb_image(1).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="none in class subfolders"):
        load_classification_data(tmp_path)


def test_unreadable_folder(tmp_path, monkeypatch):
    make_class_tree(tmp_path, {"a": 2, "b": 2})
    locked = str(tmp_path / "b")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(imagefolder.os, "scandir", scandir)
    with pytest.raises(DataError, match="permission denied") as err:
        load_classification_data(tmp_path)
    assert err.value.path == locked


def test_train_and_val_classes_differ(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_class_tree(tmp_path / "val", {"a": 1, "d": 1})
    with pytest.raises(DataError) as err:
        load_classification_data(tmp_path)
    message = str(err.value)
    assert "only in train: b, c" in message and "only in val: d" in message
    assert err.value.path == str(tmp_path / "val")


# ---------------------------------------------------------------- data YAML

def test_yaml_spec(tmp_path):
    make_class_tree(tmp_path / "sets" / "flowers" / "tr", {"daisy": 2, "rose": 3})
    make_class_tree(tmp_path / "sets" / "flowers" / "va", {"daisy": 1, "rose": 1})
    (tmp_path / "cfg").mkdir()
    spec = tmp_path / "cfg" / "flowers.yaml"
    spec.write_text("path: ../sets/flowers\ntrain: tr\nval: va\nnames:\n  0: rose\n  1: daisy\n")
    data = load_classification_data(str(spec))
    assert data.names == ["rose", "daisy"]
    assert (len(data.train), len(data.val)) == (5, 2)
    assert Counter(data.train.labels.tolist()) == {0: 3, 1: 2}
    assert data.source.startswith("flowers.yaml:")


def test_yaml_names_default_to_folders_and_digit_folders(tmp_path):
    make_class_tree(tmp_path / "train", {"0": 2, "1": 2})
    make_class_tree(tmp_path / "val", {"0": 1, "1": 1})
    (tmp_path / "a.yaml").write_text("train: train\nval: val\n")
    assert load_classification_data(tmp_path / "a.yaml").names == ["0", "1"]
    (tmp_path / "b.yaml").write_text("train: train\nval: val\nnames: [zero, one]\n")
    data = load_classification_data(tmp_path / "b.yaml")
    assert data.names == ["zero", "one"] and data.train.labels.tolist() == [0, 0, 1, 1]


def test_yaml_with_idx_folder_and_names(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(10) % 3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 4)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3))
    (tmp_path / "d.yaml").write_text("path: .\nnames: [x, y, z]\n")
    data = load_classification_data(tmp_path / "d.yaml")
    assert data.names == ["x", "y", "z"] and (len(data.train), len(data.val)) == (10, 3)
    (tmp_path / "e.yaml").write_text("path: .\nnames: [x, y]\n")
    with pytest.raises(DataError, match="labels go up to 2") as err:
        load_classification_data(tmp_path / "e.yaml")
    assert (err.value.path, err.value.line) == (str(tmp_path / "e.yaml"), 2)


def test_yaml_missing_folder_names_line(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 1})
    spec = tmp_path / "data.yaml"
    spec.write_text("# classes\npath: .\ntrain: train\nval: validation\n")
    with pytest.raises(DataError) as err:
        load_classification_data(spec)
    assert (err.value.path, err.value.line) == (str(spec), 4)
    assert "validation" in str(err.value) and str(err.value).startswith(f"{spec}:4: ")


def test_malformed_yaml_names_line(tmp_path):
    spec = tmp_path / "data.yaml"
    spec.write_text("path: .\ntrain: train\nval: [val\nnames: x\n")
    with pytest.raises(DataError, match="malformed YAML") as err:
        load_classification_data(spec)
    assert err.value.path == str(spec) and err.value.line in (3, 4, 5)
    spec.write_text("path: .\n  train: x\n")
    with pytest.raises(DataError, match="malformed YAML") as err:
        load_classification_data(spec)
    assert err.value.line == 2


def test_yaml_names_mismatch_and_bad_names(tmp_path):
    make_class_tree(tmp_path / "train", {"cat": 1, "dog": 1})
    spec = tmp_path / "data.yaml"
    spec.write_text("train: train\nnames: [cat, cow]\n")
    with pytest.raises(DataError, match="only in names: cow; only in folders: dog") as err:
        load_classification_data(spec)
    assert err.value.line == 2
    spec.write_text("train: train\nnames: {0: cat, 2: dog}\n")
    with pytest.raises(DataError, match="without gaps") as err:
        load_classification_data(spec)
    assert err.value.line == 2


def test_errors_are_one_line_cnnkit_errors(tmp_path):
    spec = tmp_path / "data.yaml"
    spec.write_text("- just\n- a list\n")
    with pytest.raises(CnnkitError) as err:
        load_classification_data(spec)
    assert "\n" not in str(err.value) and err.value.line == 1
