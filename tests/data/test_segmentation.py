"""Segmentation data: folder, VOC and YAML sources, mask decoding, bad inputs, transforms, scenes-seg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cnnkit.data import scenes
from cnnkit.data.segmentation import (VOC_CLASSES, SegmentationDataset, decode_mask, load_segmentation_data,
                                      segment_eval_transform, segment_train_transform, segmentation_collate)
from cnnkit.errors import DataError, ShapeError
from cnnkit.tasks.segmentation_metrics import voc_palette

# ---------------------------------------------------------------- helpers


def pattern(h: int, w: int, seed: int, classes: int = 3, block: int = 8) -> np.ndarray:
    """An index mask of square blocks of random classes (asymmetric, so a flip shows)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, size=(-(-h // block), -(-w // block)))
    return np.kron(blocks, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def image_for(mask: np.ndarray) -> np.ndarray:
    """A grey RGB image whose every channel is 60 * class + 30: the mask can be read back from it."""
    grey = (60 * mask.astype(np.int64) + 30).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def make_folder(root: Path, counts=None, size=(40, 24), fmt="png", flat=False) -> dict[str, list[np.ndarray]]:
    """root/images/<split>/<i>.<fmt> and root/masks/<split>/<i>.png; returns the masks written."""
    counts = counts or {"train": 5, "val": 2}
    written = {}
    for split, n in counts.items():
        images = root / "images" if flat else root / "images" / split
        masks = root / "masks" if flat else root / "masks" / split
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        written[split] = []
        for i in range(n):
            m = pattern(size[1], size[0], seed={"train": 0, "val": 100}.get(split, 200) + i)
            Image.fromarray(image_for(m)).save(images / f"{split}{i}.{fmt}")
            Image.fromarray(m, "L").save(masks / f"{split}{i}.png")
            written[split].append(m)
    return written


def make_voc(root: Path, n_train=3, n_val=2, size=(36, 28)) -> Path:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = [v for rgb in voc_palette() for v in rgb]
    ids = {"train": [f"2007_{i:06d}" for i in range(n_train)],
           "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for split, names in ids.items():
        for k, image_id in enumerate(names):
            m = pattern(size[1], size[0], seed=k, classes=21)
            m[0, :] = 255  # the VOC border
            Image.fromarray(image_for(m % 4)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            p = Image.fromarray(m, "P")
            p.putpalette(palette)
            p.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def reason(exc_info) -> str:
    return str(exc_info.value)


# ---------------------------------------------------------------- sources


def test_folder_layout(tmp_path):
    written = make_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\nroad\ncar\n")
    data = load_segmentation_data(tmp_path)
    assert (len(data.train), len(data.val)) == (5, 2) and data.in_memory and data.train.in_memory
    assert data.names == ["background", "road", "car"] and data.ignore_index == 255 and data.num_classes == 3
    assert "5 train / 2 val" in data.source
    image, mask = data.val[1]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 24, 40)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (24, 40)
    assert torch.equal(mask, torch.from_numpy(written["val"][1]).long())
    assert torch.equal(image[0], torch.from_numpy(image_for(written["val"][1])[..., 0]))
    # reading each file in __getitem__ gives the same samples
    lazy = load_segmentation_data(tmp_path, cache_bytes=0)
    assert not lazy.in_memory and lazy.train.pixels is None
    for i in range(5):
        a, b = data.train[i], lazy.train[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_folder_without_names_and_splits(tmp_path):
    make_folder(tmp_path, counts={"train": 10}, flat=True)
    data = load_segmentation_data(tmp_path)
    assert data.names == ["background", "class_1", "class_2"]
    assert (len(data.train), len(data.val)) == (8, 2)
    assert any("no val split" in n for n in data.notes) and any("no class names" in n for n in data.notes)
    # the split depends only on the paths
    again = load_segmentation_data(tmp_path, cache_bytes=0)
    assert [p for p, _ in again.val.pairs] == [p for p, _ in data.val.pairs]
    assert again.names == data.names


def test_jpeg_images_with_png_masks_and_subfolders(tmp_path):
    (tmp_path / "images" / "train" / "a").mkdir(parents=True)
    (tmp_path / "masks" / "train" / "a").mkdir(parents=True)
    m = pattern(16, 16, 0)
    for name in ("x", "y", "z"):
        Image.fromarray(image_for(m)).save(tmp_path / "images" / "train" / "a" / f"{name}.jpg")
        Image.fromarray(m).save(tmp_path / "masks" / "train" / "a" / f"{name}.png")
    data = load_segmentation_data(tmp_path)
    assert len(data.train) + len(data.val) == 3
    assert torch.equal(data.train[0][1], torch.from_numpy(m).long())


def test_voc_layout(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit" / "VOC2012")
    for spec in (root, tmp_path, tmp_path / "VOCdevkit"):
        data = load_segmentation_data(spec)
        assert data.names == list(VOC_CLASSES) and len(data.names) == 21
        assert (len(data.train), len(data.val)) == (3, 2) and "Pascal VOC" in data.source
    image, mask = data.train[2]
    expected = pattern(28, 36, seed=2, classes=21).astype(np.int64)
    expected[0, :] = 255
    assert image.shape == (3, 28, 36) and torch.equal(mask, torch.from_numpy(expected))
    assert 255 in mask.unique().tolist() and int(mask[mask != 255].max()) < 21


def test_voc_trainval_only_is_split(tmp_path):
    root = make_voc(tmp_path, n_train=5, n_val=0)
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").rename(sets / "trainval.txt")
    (sets / "val.txt").unlink()
    data = load_segmentation_data(root)
    assert (len(data.train), len(data.val)) == (4, 1)


def test_data_yaml(tmp_path):
    written = make_folder(tmp_path / "d")
    (tmp_path / "d" / "masks").rename(tmp_path / "d" / "labels_png")
    (tmp_path / "data.yaml").write_text("path: d\ntrain: images/train\nval: images/val\n"
                                        "train_masks: labels_png/train\nval_masks: labels_png/val\n"
                                        "names: [bg, a, b]\nignore_index: 250\n")
    data = load_segmentation_data(tmp_path / "data.yaml")
    assert data.names == ["bg", "a", "b"] and data.ignore_index == 250 and data.train.ignore_index == 250
    assert torch.equal(data.val[0][1], torch.from_numpy(written["val"][0]).long())
    assert "data YAML" in data.source


def test_data_yaml_default_mask_folders(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: bg, 1: a, 2: b}\n")
    for spec in (tmp_path / "data.yaml", tmp_path):  # a folder with a data.yaml is read through it
        data = load_segmentation_data(spec)
        assert data.names == ["bg", "a", "b"] and (len(data.train), len(data.val)) == (5, 2)
        assert data.train.pairs[0][1] == tmp_path / "masks" / "train" / "train0.png"


@pytest.mark.parametrize("text, line, words", [
    ("train: images/train\ntrain_masks: nowhere\n", 2, "'train_masks' folder"),
    ("train: images/train\nnames: [a, b]\nignore_index: 1\n", 3, "is a class index"),
    ("train: images/train\nignore_index: -1\n", 2, "whole number"),
    ("names: [a]\nval: images/val\n", None, "no 'train'"),
])
def test_data_yaml_errors_name_the_line(tmp_path, text, line, words):
    make_folder(tmp_path)
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(DataError, match=words) as e:
        load_segmentation_data(tmp_path / "data.yaml")
    assert e.value.path == str(tmp_path / "data.yaml") and e.value.line == line and e.value.fix


def test_data_yaml_without_images_in_path(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "pics").mkdir()
    (tmp_path / "data.yaml").write_text("names: [a, b, c]\ntrain: pics\n")
    with pytest.raises(DataError, match="train_masks") as e:
        load_segmentation_data(tmp_path / "data.yaml")
    assert e.value.line == 2


def test_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="scenes-seg"):
        load_segmentation_data("scenes-se")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a segmentation dataset folder"):
        load_segmentation_data(tmp_path / "empty")


# ---------------------------------------------------------------- mask files


def test_decode_mask_modes(tmp_path):
    m = pattern(12, 20, 3, classes=5)
    m[2, 3] = 255
    expected = torch.from_numpy(m.astype(np.int64))
    Image.fromarray(m, "L").save(tmp_path / "l.png")
    p = Image.fromarray(m, "P")
    p.putpalette([v for rgb in voc_palette() for v in rgb])
    p.save(tmp_path / "p.png")
    Image.fromarray(m.astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(image_for(m) * 0 + m[..., None]).save(tmp_path / "grey_rgb.png")  # R = G = B
    for name in ("l.png", "p.png", "i16.png", "grey_rgb.png"):
        out = decode_mask(tmp_path / name, 5)
        assert out.dtype == torch.int64 and torch.equal(out, expected), name
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "P"
    with Image.open(tmp_path / "i16.png") as img:
        assert img.mode.startswith("I")
    # 16-bit masks carry class indices above 255
    big = np.full((4, 4), 300, np.uint16)
    Image.fromarray(big).save(tmp_path / "big.png")
    assert int(decode_mask(tmp_path / "big.png", 301).max()) == 300


def test_colour_mask_is_refused(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:5, 2:5] = (128, 0, 0)  # VOC's aeroplane colour, saved as RGB instead of a palette index
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        with pytest.raises(DataError, match="colour mask where an index mask is expected") as e:
            decode_mask(tmp_path / name, 21)
        assert e.value.path == str(tmp_path / name) and "palette" in e.value.fix and "index" in e.value.fix


def test_value_out_of_range(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[1, 1], m[2, 2], m[3, 3] = 7, 9, 255
    Image.fromarray(m).save(tmp_path / "m.png")
    with pytest.raises(DataError) as e:
        decode_mask(tmp_path / "m.png", 5)
    assert e.value.path == str(tmp_path / "m.png")
    assert "7, 9" in reason(e) and "5 classes" in reason(e) and "255" in reason(e)
    assert decode_mask(tmp_path / "m.png", 10).max() == 255  # 255 = ignore, not a class
    with pytest.raises(DataError, match="255"):
        decode_mask(tmp_path / "m.png", 10, ignore_index=250)


def test_unreadable_mask(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read mask") as e:
        decode_mask(tmp_path / "bad.png", 3)
    assert e.value.path == str(tmp_path / "bad.png") and e.value.fix


# ---------------------------------------------------------------- bad datasets: one DataError naming the file


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_bad_dataset_files(tmp_path, cache_bytes):
    def fresh(name: str) -> Path:
        root = tmp_path / f"{name}-{cache_bytes}"
        make_folder(root)
        (root / "classes.txt").write_text("bg\na\nb\n")
        return root

    root = fresh("size")
    bad = root / "masks" / "train" / "train3.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    with pytest.raises(DataError, match="mask is 10x10 but its image .*train3.png is 40x24") as e:
        load_segmentation_data(root, cache_bytes=cache_bytes)
    assert e.value.path == str(bad)

    root = fresh("colour")
    bad = root / "masks" / "val" / "val1.png"
    Image.fromarray(np.dstack([pattern(24, 40, 0)] * 2 + [np.zeros((24, 40), np.uint8)])).save(bad)
    with pytest.raises(DataError, match="colour mask") as e:
        data = load_segmentation_data(root, cache_bytes=cache_bytes)
        data.val[1]  # read lazily: the error comes when the sample is read
    assert e.value.path == str(bad)

    root = fresh("value")
    bad = root / "masks" / "train" / "train0.png"
    Image.fromarray(np.full((24, 40), 3, np.uint8)).save(bad)
    with pytest.raises(DataError, match="mask value 3 outside the 3 classes") as e:
        data = load_segmentation_data(root, cache_bytes=cache_bytes)
        data.train[0]
    assert e.value.path == str(bad)

    root = fresh("missing")
    (root / "masks" / "train" / "train2.png").unlink()
    with pytest.raises(DataError, match="no mask for this image") as e:
        load_segmentation_data(root, cache_bytes=cache_bytes)
    assert e.value.path == str(root / "images" / "train" / "train2.png")
    assert str(root / "masks" / "train" / "train2.png") in reason(e)

    root = fresh("unreadable")
    bad = root / "masks" / "val" / "val0.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read mask") as e:
        load_segmentation_data(root, cache_bytes=cache_bytes)
    assert e.value.path == str(bad)

    root = fresh("image")
    bad = root / "images" / "train" / "train1.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot") as e:
        load_segmentation_data(root, cache_bytes=cache_bytes)
    assert e.value.path == str(bad)


def test_voc_list_names_missing_image(tmp_path):
    root = make_voc(tmp_path)
    lst = root / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text("2008_000000\n\n2009_999999\n")
    with pytest.raises(DataError, match="2009_999999") as e:
        load_segmentation_data(root)
    assert e.value.path == str(lst) and e.value.line == 3
    lst.write_text("2008_000000\n")
    (root / "SegmentationClass" / "2008_000000.png").unlink()
    with pytest.raises(DataError, match="no mask") as e:
        load_segmentation_data(root)
    assert e.value.path == str(root / "JPEGImages" / "2008_000000.jpg")


# ---------------------------------------------------------------- transforms and batches


def interior(mask: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """Pixels whose (2 margin + 1)^2 neighbourhood lies inside the image and holds one mask value:
    resampling blends image values across region edges (bilinear, antialias), never inside."""
    m = torch.nn.functional.pad(mask.float()[None, None], (margin,) * 4, value=-1.0)
    k = 2 * margin + 1
    return (torch.nn.functional.max_pool2d(m, k, 1) == -torch.nn.functional.max_pool2d(-m, k, 1))[0, 0]


def levels(image: torch.Tensor, mask: torch.Tensor) -> dict[int, tuple[float, float]]:
    """class -> (median red level inside its regions, fraction of those pixels within 3 of it)."""
    inside = interior(mask)
    out = {}
    for k in range(3):
        region = image[0].float()[(mask == k) & inside]
        if region.numel() >= 20:
            med = float(region.median())
            out[k] = (med, float(((region - med).abs() <= 3).float().mean()))
    return out


def test_train_transform_keeps_image_and_mask_aligned():
    m = pattern(48, 64, seed=7, block=16)
    image = tv_tensors.Image(torch.from_numpy(image_for(m)).permute(2, 0, 1).contiguous())
    mask = tv_tensors.Mask(torch.from_numpy(m).long())
    transform = segment_train_transform(40)
    filled = 0
    for seed in range(25):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 40, 40) and out_image.dtype == torch.uint8
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.shape == (40, 40) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
        filled += int((out_mask == 255).any())
        found = levels(out_image, out_mask)
        assert len(found) >= 2, seed
        # inside every region the mask calls class k, the image has one grey level ...
        assert all(frac >= 0.98 for _, frac in found.values()), (seed, found)
        # ... and it is class k's level, 60 k + 30, times the brightness jitter b
        top, (brightest, _) = max(found.items())
        b = brightest / (60 * top + 30)
        assert 1 / 1.5 - 0.05 <= b <= 1.5 + 0.05
        for k, (med, _) in found.items():
            assert med == pytest.approx(b * (60 * k + 30), abs=3), (seed, k)
        # the check can fail: an image moved without its mask does not pass it
        assert min(frac for _, frac in levels(out_image.flip(-1), out_mask).values()) < 0.9
    assert filled >= 5  # translation and shrinking bring in ignored pixels


def test_eval_transform_and_collate():
    m = pattern(30, 50, seed=1)
    image = tv_tensors.Image(torch.from_numpy(image_for(m)).permute(2, 0, 1).contiguous())
    out_image, out_mask = segment_eval_transform(25)(image, tv_tensors.Mask(torch.from_numpy(m).long()))
    assert out_image.shape == (3, 25, 25) and out_mask.shape == (25, 25)
    assert set(out_mask.unique().tolist()) <= set(np.unique(m).tolist())  # nearest: no new values
    assert torch.equal(segment_train_transform(25, augment=False)(image, tv_tensors.Mask(torch.from_numpy(m)))[1],
                       out_mask)
    images, masks = segmentation_collate([(out_image, out_mask)] * 3)
    assert images.shape == (3, 3, 25, 25) and images.dtype == torch.uint8 and type(images) is torch.Tensor
    assert masks.shape == (3, 25, 25) and masks.dtype == torch.int64
    with pytest.raises(ShapeError):
        segmentation_collate([(out_image, out_mask), (image, tv_tensors.Mask(torch.from_numpy(m)))])


def test_dataset_transform_and_loader(tmp_path):
    make_folder(tmp_path, counts={"train": 6, "val": 2}, size=(50, 30))
    data = load_segmentation_data(tmp_path)
    data.train.transform = segment_train_transform(32)
    assert isinstance(data.train, SegmentationDataset)
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, collate_fn=segmentation_collate)
    images, masks = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    assert int(masks[masks != 255].max()) < len(data.names)
    # the stored samples are untouched by the transform
    assert data.train.masks.dtype == torch.uint8 and data.train._load(0)[1].shape == (30, 50)


# ---------------------------------------------------------------- the generated scenes


def test_scenes_seg(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(scenes, "DEFAULTS", {**scenes.DEFAULTS, "n_train": 6, "n_val": 3, "img_size": 64})
    data = load_segmentation_data("scenes-seg")
    assert data.names[0] == "background" and len(data.names) == 11 and data.names[1] == "T-shirt/top"
    assert (len(data.train), len(data.val)) == (6, 3) and data.in_memory and "scenes-seg" in data.source
    seen = set()
    for ds in (data.train, data.val):
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
            assert int(mask.max()) < len(data.names)
            seen |= set(mask.unique().tolist())
    assert 0 in seen and len(seen) > 2
    # the generated folder itself is a dataset too, with the same names
    folder = load_segmentation_data(scenes.ensure_scenes())
    assert folder.names == data.names and len(folder.train) == 6


def test_builtin_scenes_seg_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))  # generates the 2,300 default scenes (~10 s)
    data = load_segmentation_data("scenes-seg")
    assert (len(data.train), len(data.val)) == (4000, 300) and data.in_memory
    image, mask = data.train[0]
    assert image.shape == (3, 160, 160) and mask.shape == (160, 160)
    assert int(data.train.masks.max()) < len(data.names) == 11
