"""Semantic segmentation data: one call turns a spec into train and val datasets of (image, mask).

    data = load_segmentation_data("scenes-seg")            # the generated scenes, see cnnkit.data.scenes
    data = load_segmentation_data("VOCdevkit/VOC2012")     # Pascal VOC: 21 classes, 255 = object borders
    data = load_segmentation_data("my_data")               # images/{train,val}/*, masks/{train,val}/*.png
    data = load_segmentation_data("my_data/data.yaml")
    image, mask = data.train[0]
    # image: tv_tensors.Image uint8 [3, H, W]
    # mask:  tv_tensors.Mask int64 [H, W], the class index of every pixel (index into data.names),
    #        data.ignore_index (255) where a pixel counts for nothing (borders, unlabelled)

Sources
  scenes-seg  the scenes of `ensure_scenes()` (the same cache as detection's `scenes`); mask value 0 is
              "background", value k + 1 is item class k.
  folder      root/images/<split>/**/<stem>.<ext> with root/masks/<split>/**/<stem>.png, split = train
              and val (val optional); or root/images/* with root/masks/*. Class names, index = mask
              value: root/classes.txt or root/labels.txt (one name a line); for a folder written by the
              scene generator "background" + its item names; else "background", "class_1", ... up to
              the largest value found in the masks. A folder holding another data.yaml is read through it.
  VOC         root/JPEGImages/<id>.jpg, root/SegmentationClass/<id>.png (palette PNGs), split lists
              root/ImageSets/Segmentation/{train,val}.txt (else trainval.txt, else every mask); root may
              also be a VOCdevkit folder holding one VOC20xx. Names: the 21 VOC classes, 255 = ignore.
  data YAML   the ultralytics keys, read by `cnnkit.data.config` (errors name the line):
                  path: ../my_data            # root; default: the YAML's folder
                  train: images/train         # image folders, relative to path
                  val: images/val             # optional: without it train is split 80/20
                  names: [background, road]   # index = mask value; optional (then as a folder)
                  train_masks: masks/train    # optional; default: the image folder with its last
                  val_masks: masks/val        #   path part named `images` replaced by `masks`
                  ignore_index: 255           # optional, default 255; must not be a class index
              A mask is <mask folder>/<image path relative to the image folder, suffix .png>.

A source without a val split is split by the SHA-1 rank of each image's path (20 % val, the same on
every machine). When the decoded images and masks fit in `cache_bytes` (default 2 GiB) both are
decoded once at load time (images with `decode_many`); otherwise each pair is decoded in
`__getitem__` and only the sizes (from the file headers) are checked at load time.

Mask files (`decode_mask`): a palette PNG (mode P, as VOC) gives its palette indices; a grey image
(L, I;16, I; 1-bit) gives its values; the alpha channel of LA / PA is dropped. A colour image (RGB,
RGBA) is refused (a colour mask needs a colour -> class table that the file does not carry), except
that one whose three channels are equal everywhere is read as grey. Every value must be a class index
(0 .. len(names) - 1) or the ignore index. Each problem (missing or unreadable mask, colour mask,
value out of range, mask size differing from its image) raises one DataError naming the file.
"""

from __future__ import annotations

import difflib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.data.config import OUTSIDE_ROOT, exists, expand_user, is_dir, is_file, list_tree, resolve_inside
from cnnkit.data.images import DEFAULT_CACHE_BYTES, check_pixel_limit, decode_image, decode_many, is_image_file
from cnnkit.data.splits import VAL_FRACTION, split_rank_key
from cnnkit.errors import DataError, ShapeError
from cnnkit.utils import usable_cpus

BUILTIN_SEGMENTATION = ("scenes-seg",)
IGNORE_INDEX = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
MASK_FIX = ("save the mask as an 8-bit index PNG (mode L, pixel value = class index) or a palette PNG "
            "(mode P), e.g. PIL.Image.fromarray(ids.astype('uint8')).save('mask.png')")
SIZE_FIX = "save the mask at its image's size: one class index per image pixel"
IMAGE_FIX = "replace or delete the image (and its mask)"
NAMES_FILES = ("classes.txt", "labels.txt")

Pair = tuple[Path, Path]  # (image file, mask file)


# ---------------------------------------------------------------- one mask file

def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    return " ".join((str(exc).strip() or type(exc).__name__).split())


def _mask_array(path: Path, num_classes: int | None, ignore_index: int) -> np.ndarray:
    """The class indices of a mask file as int64 [H, W] (rules in the module docstring)."""
    try:
        with Image.open(path) as img:
            check_pixel_limit(img)
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block: keep the pixels as stored, as decode_image does
                oriented = None
            img = img.copy() if oriented is None or oriented is img else oriented
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals a bad file with many exception types
        raise DataError(f"cannot read mask: {_reason(exc)}", path=str(path), fix=MASK_FIX) from None
    mode = img.mode
    if mode in ("P", "L", "1", "I") or mode.startswith("I;16"):
        a = np.asarray(img)
    elif mode in ("PA", "LA"):
        a = np.asarray(img)[..., 0]
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise DataError(f"colour mask where an index mask is expected (mode {mode})", path=str(path),
                            fix=MASK_FIX)
        a = rgb[..., 0]
    elif mode == "F":
        raise DataError("float mask where an index mask is expected (mode F)", path=str(path), fix=MASK_FIX)
    else:
        raise DataError(f"colour mask where an index mask is expected (mode {mode})", path=str(path), fix=MASK_FIX)
    a = a.astype(np.int64)
    bad = a < 0
    if num_classes is not None:
        bad |= a >= num_classes
    bad &= a != ignore_index
    if bad.any():
        values = np.unique(a[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        what = f"{num_classes} classes (0..{num_classes - 1})" if num_classes is not None else "class indices (>= 0)"
        raise DataError(f"mask value{'s' if len(values) > 1 else ''} {shown} outside the {what}, and not the "
                        f"ignore index {ignore_index}", path=str(path),
                        fix="correct the mask, or list every class in 'names' (position = mask value)")
    return a


def decode_mask(path: str | os.PathLike, num_classes: int | None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Decode one mask file into an int64 tensor [H, W] of class indices; a bad file raises DataError.

    `num_classes` None skips the upper bound check (values must still be >= 0 or the ignore index).
    """
    return torch.from_numpy(_mask_array(Path(path), num_classes, ignore_index))


def _mask_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            check_pixel_limit(img)
            return img.size
    except MemoryError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read mask: {_reason(exc)}", path=str(path), fix=MASK_FIX) from None


def _size_mismatch(mask: Path, image: Path, mask_wh, image_wh) -> DataError:
    return DataError(f"mask is {mask_wh[0]}x{mask_wh[1]} but its image {image} is {image_wh[0]}x{image_wh[1]}",
                     path=str(mask), fix=SIZE_FIX)


# ---------------------------------------------------------------- datasets

class SegmentationDataset(Dataset):
    """Images and masks of one split; `pairs[i]` = (image file, mask file).

    When decoded at load time, image i is `pixels[offsets[i] : offsets[i] + 3*h*w].view(3, h, w)` and
    its mask `masks[offsets[i] // 3 : offsets[i] // 3 + h*w].view(h, w)` with (h, w) = `shapes[i]`
    (masks are kept as uint8 when every class index and the ignore index fit in a byte).
    """

    def __init__(self, pairs: Sequence[Pair], *, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 pixels: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 shapes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                 transform: Callable | None = None):
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.pixels, self.offsets, self.shapes, self.masks = pixels, offsets, shapes, masks
        self.transform = transform

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        if self.pixels is not None:
            h, w = (int(v) for v in self.shapes[index])
            start = int(self.offsets[index])
            pixels = self.pixels[start:start + 3 * h * w].view(3, h, w).clone()
            mask = self.masks[start // 3:start // 3 + h * w].view(h, w).to(torch.int64)
            return pixels, mask
        pixels = decode_image(image_path)
        mask = decode_mask(mask_path, self.num_classes, self.ignore_index)
        if tuple(mask.shape) != tuple(pixels.shape[1:]):
            raise _size_mismatch(mask_path, image_path, mask.shape[::-1], pixels.shape[:0:-1])
        return pixels, mask

    def __getitem__(self, index: int):
        pixels, mask = self._load(index)
        image, mask = tv_tensors.Image(pixels), tv_tensors.Mask(mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def segmentation_collate(batch):
    """(images uint8 [N, 3, H, W], masks int64 [N, H, W]); every sample must have the same size."""
    shapes = {(tuple(im.shape), tuple(m.shape)) for im, m in batch}
    if len(shapes) > 1:
        raise ShapeError(f"a batch holds samples of different sizes {sorted(shapes)}",
                         fix="resize every image and mask to one size in the transform (e.g. --img-size)")
    images = torch.stack([im.as_subclass(torch.Tensor) for im, _ in batch])
    masks = torch.stack([m.as_subclass(torch.Tensor) for _, m in batch]).to(torch.int64)
    return images, masks


@dataclass
class SegmentationData:
    """Train and val segmentation datasets: `names[v]` is the class of mask value v; pixels equal to
    `ignore_index` belong to no class; `source` describes the data in a line; `notes` holds remarks
    worth printing; `in_memory` tells whether every image and mask is already decoded."""

    train: SegmentationDataset
    val: SegmentationDataset
    names: list[str]
    source: str
    in_memory: bool = True
    ignore_index: int = IGNORE_INDEX
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------- transforms

def segment_eval_transform(img_size: int):
    """Resize image and mask to img_size x img_size (the mask by nearest neighbour)."""
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True)])


def segment_train_transform(img_size: int, augment: bool = True, ignore_index: int = IGNORE_INDEX):
    """The detection task's augmentation applied to image and mask alike: random scaling 0.8-1.2 and
    translation up to 20 %, brightness and saturation up to 1.5x, horizontal flips, then the resize.
    Mask pixels moved in from outside the image become `ignore_index` (image pixels 0); the mask is
    resampled by nearest neighbour, the image bilinearly."""
    if not augment:
        return segment_eval_transform(img_size)
    return v2.Compose([
        v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2),
                        interpolation=v2.InterpolationMode.BILINEAR,
                        fill={tv_tensors.Mask: ignore_index, "others": 0}),
        v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
        v2.RandomHorizontalFlip(),
        v2.Resize((img_size, img_size), antialias=True),
    ])


# ---------------------------------------------------------------- sources

@dataclass
class _Source:
    splits: dict[str, list[Pair]]
    names: list[str] | None
    label: str
    root: Path | None
    ignore_index: int = IGNORE_INDEX
    notes: list[str] = field(default_factory=list)


def _pairs(image_dir: Path, mask_dir: Path, notes: list[str], missing: list | None = None) -> list[Pair]:
    """Every image under image_dir with its mask mask_dir/<relative path>.png; a missing mask raises,
    or, when `missing` is a list (`cnnkit data check` gathers every problem), is appended to it as
    (image, expected mask) and the image left out."""
    images = [p for p in list_tree(image_dir) if is_image_file(p)]
    if not images:
        raise DataError("no images in this folder", path=str(image_dir),
                        fix="put the images (.jpg, .png, .bmp, .webp) there, or correct the path")
    if not mask_dir.is_dir():
        raise DataError(f"no mask folder for these images: expected {mask_dir}", path=str(image_dir),
                        fix="save one index-mask PNG per image there (same relative path, suffix .png)")
    pairs = []
    for image in images:
        mask = (mask_dir / image.relative_to(image_dir)).with_suffix(".png")
        if not mask.is_file():
            if missing is not None:
                missing.append((image, mask))
                continue
            raise DataError(f"no mask for this image: expected {mask}", path=str(image),
                            fix="save the image's index mask there as a PNG, or remove the image")
        pairs.append((image, mask))
    unused = sum(1 for p in mask_dir.rglob("*.png")) - len(pairs)
    if unused > 0:
        notes.append(f"{unused} mask files in {mask_dir} have no image and are not used")
    return pairs


def _names_file(root: Path) -> list[str] | None:
    for name in NAMES_FILES:
        f = root / name
        if f.is_file():
            try:
                names = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read the class names: {exc}", path=str(f),
                                fix="save it as UTF-8 text, one class name a line") from None
            if names:
                return names
    return None


def _read_folder(root: Path, missing: list | None = None) -> _Source:
    from cnnkit.data.scenes import is_scenes_dir, masks_dir, segmentation_names

    notes: list[str] = []
    images = root / "images"
    split_dirs = [s for s in ("train", "val") if (images / s).is_dir()]
    if split_dirs:
        if "train" not in split_dirs:
            raise DataError("no train split: images/train is missing", path=str(root),
                            fix="put the training images in images/train and their masks in masks/train")
        splits = {s: _pairs(images / s, masks_dir(root, s), notes, missing) for s in split_dirs}
    else:
        splits = {"train": _pairs(images, root / "masks", notes, missing)}
    if is_scenes_dir(root):
        names = segmentation_names(root)
    else:
        names = _names_file(root)
    return _Source(splits, names, f"{root} (image + mask folders)", root, notes=notes)


def _voc_root(path: Path) -> Path | None:
    def is_voc(p: Path) -> bool:
        return (p / "JPEGImages").is_dir() and (p / "SegmentationClass").is_dir()
    if is_voc(path):
        return path
    base = path / "VOCdevkit" if (path / "VOCdevkit").is_dir() else path
    found = sorted(p for p in base.glob("VOC*") if p.is_dir() and is_voc(p))
    if len(found) > 1:
        raise DataError(f"several VOC datasets here: {', '.join(p.name for p in found)}", path=str(path),
                        fix=f"give one of them, e.g. {found[-1]}")
    return found[0] if found else None


def _read_voc(root: Path) -> _Source:
    sets = root / "ImageSets" / "Segmentation"
    lists = {s: sets / f"{s}.txt" for s in ("train", "val") if (sets / f"{s}.txt").is_file()}
    if not lists and (sets / "trainval.txt").is_file():
        lists = {"train": sets / "trainval.txt"}
    masks = root / "SegmentationClass"
    splits: dict[str, list[Pair]] = {}
    if not lists:
        ids = [(p.stem, None, None) for p in sorted(masks.glob("*.png"))]
        if not ids:
            raise DataError("no masks in SegmentationClass and no split lists in ImageSets/Segmentation",
                            path=str(root), fix="put the palette PNG masks in SegmentationClass/")
        listed = {"train": ids}
    else:
        listed = {}
        for split, f in lists.items():
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read the split list: {exc}", path=str(f),
                                fix="save it as UTF-8 text, one image id a line") from None
            listed[split] = [(line.split()[0], f, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for split, ids in listed.items():
        pairs = []
        for image_id, list_file, line in ids:
            if "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\0" in image_id:
                raise DataError(f"path outside the dataset: image id {image_id!r} is not a plain file stem",
                                path=str(list_file or root), line=line, fix="list plain image ids, one a line")
            image = next((root / "JPEGImages" / f"{image_id}{ext}" for ext in (".jpg", ".jpeg", ".png", ".JPG")
                          if is_file(root / "JPEGImages" / f"{image_id}{ext}")), None)
            if image is None:
                raise DataError(f"image '{image_id}' not found in {root / 'JPEGImages'}",
                                path=str(list_file or masks / f"{image_id}.png"), line=line,
                                fix="add the image, or remove its id from the list")
            mask = masks / f"{image_id}.png"
            if not mask.is_file():
                raise DataError(f"no mask for this image: expected {mask}", path=str(image),
                                fix="add the SegmentationClass PNG, or remove the id from the split list")
            pairs.append((image, mask))
        if not pairs:
            raise DataError("the split list names no images", path=str(lists.get(split, root)),
                            fix="list one image id a line")
        splits[split] = pairs
    return _Source(splits, list(VOC_CLASSES), f"{root} (Pascal VOC)", root)


def _yaml_folder(cfg, key: str, value) -> Path:
    make = cfg.error_at(key)
    if not isinstance(value, str):
        raise make(f"'{key}' must be a folder name, got {value!r}", fix=f"write {key}: <folder>")
    folder = resolve_inside(cfg.root, expand_user(value))
    if folder is None:
        raise make(f"{OUTSIDE_ROOT}: '{key}' {value!r} points outside the dataset root {cfg.root}",
                   fix=f"give a folder inside {cfg.root}, or set 'path' to a folder that holds it")
    if not is_dir(folder):
        raise make(f"'{key}' folder {folder} does not exist",
                   fix=f"create it or correct '{key}' (relative to 'path' = {cfg.root})")
    return folder


def _default_masks(cfg, split: str, images: Path) -> Path:
    parts = list(images.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "masks"
            return Path(*parts)
    raise cfg.error_at(split)(f"cannot tell where the masks of {images} are: no 'images' in its path",
                              fix=f"add {split}_masks: <folder of the {split} masks>")


def _read_yaml(file: Path, missing: list | None = None) -> _Source:
    from cnnkit.data.config import read_data_yaml

    cfg = read_data_yaml(file)
    if cfg.train is None:
        raise cfg.error_at(None)("no 'train' folder", fix="add train: <folder of training images>")
    ignore = cfg.values.get("ignore_index", IGNORE_INDEX)
    bad_ignore = cfg.error_at("ignore_index")
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 65535:
        raise bad_ignore(f"'ignore_index' must be a whole number 0..65535, got {ignore!r}",
                         fix="write ignore_index: 255")
    if cfg.names is not None and ignore < len(cfg.names):
        raise bad_ignore(f"ignore_index {ignore} is a class index ('names' lists {len(cfg.names)} classes)",
                         fix="use a value >= the number of classes, e.g. 255")
    notes: list[str] = []
    splits = {}
    for split in ("train", "val"):
        images = getattr(cfg, split)
        if images is None:
            continue
        key = f"{split}_masks"
        masks = (_yaml_folder(cfg, key, cfg.values[key]) if cfg.values.get(key) is not None
                 else _default_masks(cfg, split, images))
        splits[split] = _pairs(images, masks, notes, missing)
    return _Source(splits, cfg.names, f"{file} (data YAML)", cfg.root, ignore_index=ignore, notes=notes)


def _read_source(spec: str | os.PathLike, missing: list | None = None) -> _Source:
    """The pairs of every split; `missing`: see `_pairs`."""
    text = os.fspath(spec)
    if text in BUILTIN_SEGMENTATION:
        from cnnkit.data.scenes import ensure_scenes, masks_dir, segmentation_names

        root = ensure_scenes()
        notes: list[str] = []
        splits = {s: _pairs(root / "images" / s, masks_dir(root, s), notes, missing) for s in ("train", "val")}
        return _Source(splits, segmentation_names(root), f"scenes-seg (generated, {root})", root, notes=notes)
    path = expand_user(text)
    if not exists(path):
        close = difflib.get_close_matches(text, BUILTIN_SEGMENTATION, n=1, cutoff=0.5)
        raise DataError("dataset not found: no such file or folder", path=text,
                        fix=f"did you mean {close[0]}?" if close else
                        "give a data YAML, an images/ + masks/ folder, a Pascal VOC folder or 'scenes-seg'")
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return _read_yaml(path, missing)
        raise DataError("not a data YAML", path=text, fix="give a .yaml file, or the dataset folder")
    voc = _voc_root(path)
    if voc is not None:
        return _read_voc(voc)
    from cnnkit.data.scenes import is_scenes_dir

    if (path / "data.yaml").is_file() and not is_scenes_dir(path):
        return _read_yaml(path / "data.yaml", missing)
    if (path / "images").is_dir():
        return _read_folder(path, missing)
    raise DataError("not a segmentation dataset folder (no images/, JPEGImages/ or data.yaml)", path=text,
                    fix="use images/{train,val}/* with masks/{train,val}/<stem>.png, or the Pascal VOC layout")


def _split_val(pairs: list[Pair], root: Path | None) -> tuple[list[Pair], list[Pair]]:
    def key(pair: Pair) -> str:
        try:
            return pair[0].resolve().relative_to(root.resolve()).as_posix() if root else pair[0].name
        except ValueError:
            return pair[0].as_posix()
    n_val = int(len(pairs) * VAL_FRACTION + 0.5) if len(pairs) > 1 else 0
    ranked = sorted(range(len(pairs)), key=lambda i: split_rank_key(key(pairs[i])))
    val = set(ranked[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


# ---------------------------------------------------------------- decoding a split

def _workers() -> int:
    return max(1, min(16, usable_cpus()))


def _mask_dtype(num_classes: int | None, ignore_index: int) -> torch.dtype:
    small = num_classes is not None and num_classes <= 256 and 0 <= ignore_index <= 255
    return torch.uint8 if small else torch.int32


def _largest(a: np.ndarray, ignore_index: int) -> int:
    values = a[a != ignore_index]
    return int(values.max()) if values.size else -1


@dataclass
class _Decoded:
    """A split decoded at load time (layout in `SegmentationDataset`); `largest`: the largest class
    value in its masks when the classes are unknown, else -1."""

    pixels: torch.Tensor
    offsets: torch.Tensor
    shapes: torch.Tensor
    masks: torch.Tensor
    largest: int

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() + self.masks.numel() * self.masks.element_size()


def _decode_split(pairs: list[Pair], num_classes: int | None, ignore_index: int, budget: int) -> _Decoded | None:
    """Every pair of the split decoded, or None when the images and masks would take more than
    `budget` bytes."""
    dtype = _mask_dtype(num_classes, ignore_index)
    per_pixel = 3 + torch.empty((), dtype=dtype).element_size()
    decoded = decode_many([str(i) for i, _ in pairs], cache_bytes=budget * 3 // per_pixel)
    if decoded.bad:
        path, reason = decoded.bad[0]
        raise DataError(f"cannot decode image: {reason}", path=path, fix=IMAGE_FIX)
    if decoded.pixels is None:
        return None
    masks = torch.empty(decoded.pixels.numel() // 3, dtype=dtype)

    def one(i: int) -> int:
        image, mask = pairs[i]
        h, w = (int(v) for v in decoded.shapes[i])
        a = _mask_array(mask, num_classes, ignore_index)
        if a.shape != (h, w):
            raise _size_mismatch(mask, image, a.shape[::-1], (w, h))
        start = int(decoded.offsets[i]) // 3
        masks[start:start + h * w].view(h, w).copy_(torch.from_numpy(a))
        return _largest(a, ignore_index) if num_classes is None else -1

    with ThreadPoolExecutor(_workers()) as pool:
        largest = max(pool.map(one, range(len(pairs))), default=-1)
    return _Decoded(decoded.pixels, decoded.offsets, decoded.shapes, masks, largest)


def _check_lazily(pairs: list[Pair], num_classes: int | None, ignore_index: int) -> int:
    """Compare every mask's size with its image's (file headers); when the classes are unknown also
    decode every mask to find the largest value, which is returned (else -1)."""
    from cnnkit.data.images import read_image_size

    def one(i: int) -> int:
        image, mask = pairs[i]
        iw, ih = read_image_size(image)
        mw, mh = _mask_size(mask)
        if (mw, mh) not in ((iw, ih), (ih, iw)):  # (ih, iw): an EXIF rotation, checked once decoded
            raise _size_mismatch(mask, image, (mw, mh), (iw, ih))
        return _largest(_mask_array(mask, None, ignore_index), ignore_index) if num_classes is None else -1

    with ThreadPoolExecutor(_workers()) as pool:
        return max(pool.map(one, range(len(pairs))), default=-1)


def load_segmentation_data(spec: str | os.PathLike, *, cache_bytes: int | None = None) -> SegmentationData:
    """Load a segmentation dataset: `spec` is "scenes-seg", a data YAML, an images/ + masks/ folder or
    a Pascal VOC folder (see the module docstring). `cache_bytes`: when all decoded images and masks
    total at most this (default 2 GiB) they are decoded once here, else in `__getitem__`.
    Any bad image, mask or list entry raises DataError naming the file."""
    budget = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
    src = _read_source(spec)
    ignore = src.ignore_index
    train = src.splits["train"]
    val = src.splits.get("val")
    notes = list(src.notes)
    if val is None:
        train, val = _split_val(train, src.root)
        notes.append(f"no val split: {len(val)} of the train images held out (by SHA-1 of their paths)")
        if not val:
            raise DataError("one image is too few to split into train and val", path=str(src.root or spec),
                            fix="add images, or give a val split")
    num_classes = len(src.names) if src.names else None

    loaded: list[_Decoded | None] = []
    for pairs in (train, val):
        out = _decode_split(pairs, num_classes, ignore, budget)
        budget -= out.nbytes if out is not None else 0
        loaded.append(out)
    in_memory = all(out is not None for out in loaded)
    largest = -1
    for out, pairs in zip(loaded, (train, val)):
        # a split left on disk still has its mask sizes checked (and scanned for classes) here
        largest = max(largest, out.largest if out is not None else _check_lazily(pairs, num_classes, ignore))
    if src.names:
        names = list(src.names)
    else:
        if largest > ignore:
            raise DataError(f"mask values go up to {largest}, past the ignore index {ignore}",
                            path=str(src.root or spec),
                            fix=f"list the class names ({NAMES_FILES[0]} or 'names'), and an ignore_index above them")
        names = ["background"] + [f"class_{v}" for v in range(1, max(largest, 0) + 1)]
        notes.append(f"no class names given: {len(names)} classes named by mask value "
                     f"(add {NAMES_FILES[0]}, one name a line, to name them)")
    datasets = []
    for pairs, out in zip((train, val), loaded):
        kw = dict(num_classes=len(names), ignore_index=ignore)
        if out is not None:
            masks = out.masks
            if masks.dtype != torch.uint8 and _mask_dtype(len(names), ignore) == torch.uint8:
                masks = masks.to(torch.uint8)
            kw.update(pixels=out.pixels, offsets=out.offsets, shapes=out.shapes, masks=masks)
        datasets.append(SegmentationDataset(pairs, **kw))
    tr, va = datasets
    source = f"{src.label}: {len(tr)} train / {len(va)} val images, {len(names)} classes"
    return SegmentationData(train=tr, val=va, names=names, source=source, in_memory=in_memory,
                            ignore_index=ignore, notes=notes)
