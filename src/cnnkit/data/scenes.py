"""Scenes: a detection and segmentation dataset composed from real images, generated offline.

Each scene is a random crop of a real photograph or texture (CC0 / public domain, shipped in
`cnnkit/assets/backgrounds/` and `cnnkit/assets/photos/`, see assets/LICENSES.md), resized to
img_size x img_size, flipped at random and tinted per channel, with 1-4 Fashion-MNIST items on it.
Train scenes take items from the embedded train split, val scenes from the embedded val split, so no
item is in both. An item is scaled by s ~ U(1, 4) (28 -> 28..112 px); its grey values, divided by
their maximum, are the alpha of a flat colour chosen to contrast with the background under it:
out = background (1 - a) + colour a. An item may overlap those placed before it by at most
`max_overlap` of the smaller one's box (intersection / smaller area), and covers them where it does.

Labels come from what is visible: the pixels with a > `threshold` form the item's mask, later items
overwrite earlier ones, and an item's box is the tight box of its visible mask pixels (an item with
none left is dropped). Written as YOLO txt (images/, labels/, data.yaml), COCO JSON (annotations/)
and index masks (masks/<split>/<name>.png, 8-bit: 0 = background, class id + 1 = item).

Every random draw of scene i of a split comes from numpy's generator seeded with (seed, split, i),
so the same arguments give byte-identical files (on the same Pillow/libjpeg).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.data.formats import DetectionRecord, DetectionSplits, staging_dir
from cnnkit.data.formats.coco import write_coco_json
from cnnkit.data.formats.yolo import write_yolo_labels
from cnnkit.errors import DataError, UsageError
from cnnkit.utils import usable_cpus


@dataclass(frozen=True)
class SceneSettings:
    """How each scene is composed (see the module doc): between `min_items` and `max_items` items,
    each scaled by s ~ U(`min_scale`, `max_scale`), overlapping earlier ones by at most `max_overlap`
    of the smaller box, its mask the pixels whose alpha exceeds `threshold`."""

    min_items: int = 1
    max_items: int = 4
    min_scale: float = 1.0
    max_scale: float = 4.0
    max_overlap: float = 0.3
    threshold: float = 0.1


VERSION = "scenes-v1"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# every parameter of a scene set, with its default: what `ensure_scenes` takes and its cache key hashes
DEFAULTS = {"n_train": 4000, "n_val": 300, "img_size": 160, "seed": 0, **asdict(SceneSettings())}
SETTING_NAMES = tuple(f.name for f in fields(SceneSettings))
JPEG_QUALITY = 90
_SPLIT_CODE = {"train": 0, "val": 1}


def background_files() -> list[Path]:
    """The background images, in a fixed order."""
    return sorted((ASSETS / "backgrounds").glob("*.jpg")) + sorted((ASSETS / "photos").glob("*.jpg"))


def _load_backgrounds() -> list[np.ndarray]:
    files = background_files()
    if not files:
        raise DataError("no background images", path=str(ASSETS / "backgrounds"),
                        fix="reinstall cnnkit (the images ship as package data)")
    out = []
    for f in files:
        with Image.open(f) as img:
            out.append(np.asarray(img.convert("RGB")))
    return out


def _load_items() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from cnnkit.data.builtin import load_fashion_mnist_embedded

    data = load_fashion_mnist_embedded()
    return {"train": (data.train.images[:, 0].numpy(), data.train.labels.numpy()),
            "val": (data.val.images[:, 0].numpy(), data.val.labels.numpy())}


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def compose_scene(rng: np.random.Generator, backgrounds: list[np.ndarray], items: np.ndarray,
                  item_labels: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (image uint8 [S, S, 3], mask uint8 [S, S], boxes int [N, 4] XYXY, labels int [N])."""
    size = p["img_size"]
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    h, w = bg.shape[:2]
    m = min(h, w)
    crop = int(rng.integers(max(16, m // 3), m + 1))
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    patch = Image.fromarray(bg[y:y + crop, x:x + crop]).resize((size, size), Image.BILINEAR)
    canvas = np.asarray(patch, dtype=np.float32)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    canvas = canvas * rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    instance = np.zeros((size, size), np.uint8)  # item index + 1, 0 = background

    placed: list[tuple[int, int, int, int, int]] = []  # (x0, y0, side, class, instance id)
    boxes_drawn: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(p["min_items"], p["max_items"] + 1))):
        j = int(rng.integers(len(items)))
        side = min(size, int(round(28 * rng.uniform(p["min_scale"], p["max_scale"]))))
        grey = np.asarray(Image.fromarray(items[j]).resize((side, side), Image.BILINEAR), dtype=np.float32)
        peak = float(grey.max())
        if peak <= 0:
            continue
        alpha = grey / peak
        solid = alpha > p["threshold"]
        rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
        tight = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        for _attempt in range(20):
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = (tight[0] + x0, tight[1] + y0, tight[2] + x0, tight[3] + y0)
            if all(_overlap(box, other) <= p["max_overlap"] for other in boxes_drawn):
                break
        else:
            continue
        region = canvas[y0:y0 + side, x0:x0 + side]
        colour = rng.uniform(0.0, 1.0, size=3)
        colour = 255 * (0.35 * colour if region.mean() > 127 else 0.65 + 0.35 * colour)
        a = alpha[..., None]
        canvas[y0:y0 + side, x0:x0 + side] = region * (1 - a) + colour.astype(np.float32) * a
        ident = len(placed) + 1
        instance[y0:y0 + side, x0:x0 + side][solid] = ident
        placed.append((x0, y0, side, int(item_labels[j]), ident))
        boxes_drawn.append(box)

    lut = np.zeros(256, np.uint8)
    boxes, labels = [], []
    for x0, y0, side, cls, ident in placed:
        visible = instance[y0:y0 + side, x0:x0 + side] == ident
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        if len(rows) == 0:
            continue
        boxes.append((x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1))
        labels.append(cls)
        lut[ident] = cls + 1
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return (image, lut[instance], np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(labels, np.int64))


def _workers() -> int:
    return max(1, min(8, usable_cpus()))


def _check(p: dict) -> None:
    """Refuse impossible parameters; whole-number ones become ints in place."""
    for k in ("n_train", "n_val", "img_size", "seed", "min_items", "max_items"):
        if isinstance(p[k], bool) or not float(p[k]).is_integer() or p[k] < 0:
            raise UsageError(f"{k} must be a whole number >= 0, got {p[k]!r}", fix=f"give {k} as an integer")
        p[k] = int(p[k])
    if p["img_size"] < 28 or p["n_train"] < 1:
        raise UsageError(f"need img_size >= 28 and n_train >= 1, got {p['img_size']} and {p['n_train']}",
                         fix="e.g. img_size=160, n_train=4000")
    if not p["min_items"] <= p["max_items"] <= 255:
        raise UsageError(f"need min_items <= max_items <= 255, got {p['min_items']}, {p['max_items']}",
                         fix="e.g. min_items=1, max_items=4")
    if not 0 < p["min_scale"] <= p["max_scale"]:
        raise UsageError(f"need 0 < min_scale <= max_scale, got {p['min_scale']}, {p['max_scale']}",
                         fix="e.g. min_scale=1, max_scale=4")
    if not 0 <= p["max_overlap"] <= 1 or not 0 <= p["threshold"] < 1:
        raise UsageError("max_overlap must lie in [0, 1] and threshold in [0, 1)", fix="e.g. 0.3 and 0.1")


def generate_scenes(out_dir: str | os.PathLike, *, n_train: int = 4000, n_val: int = 300, img_size: int = 160,
                    seed: int = 0, settings: SceneSettings = SceneSettings()) -> Path:
    """Generate the scenes into `out_dir` (new or empty; it appears in one rename) and return it.

    `n_train` and `n_val` scenes of `img_size` x `img_size` pixels, drawn from `seed`, each composed
    as `settings` says (items per scene, their scale, overlap and mask threshold).
    Layout: data.yaml, images/{train,val}/<split>_<i>.jpg, labels/{train,val}/*.txt (YOLO),
    annotations/instances_{train,val}.json (COCO), masks/{train,val}/*.png (index masks).
    """
    if not isinstance(settings, SceneSettings):
        raise UsageError(f"settings must be a SceneSettings, got {type(settings).__name__}",
                         fix="pass settings=SceneSettings(min_items=..., max_items=..., ...)")
    p = {"n_train": n_train, "n_val": n_val, "img_size": img_size, "seed": seed, **asdict(settings)}
    _check(p)
    n_train, n_val, img_size = p["n_train"], p["n_val"], p["img_size"]
    backgrounds = _load_backgrounds()
    pools = _load_items()
    out_dir = Path(out_dir).expanduser()
    with staging_dir(out_dir) as tmp:
        splits: dict[str, list[DetectionRecord]] = {}
        file_names: dict[str, list[str]] = {}
        for split, count in (("train", n_train), ("val", n_val)):
            for sub in ("images", "masks"):
                (tmp / sub / split).mkdir(parents=True)
            items, item_labels = pools[split]

            def make(i: int, split=split, items=items, item_labels=item_labels):
                rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
                image, mask, boxes, labels = compose_scene(rng, backgrounds, items, item_labels, p)
                name = f"{split}_{i:05d}"
                Image.fromarray(image).save(tmp / "images" / split / f"{name}.jpg", "JPEG", quality=JPEG_QUALITY)
                Image.fromarray(mask, "L").save(tmp / "masks" / split / f"{name}.png", "PNG")
                return DetectionRecord(out_dir / "images" / split / f"{name}.jpg", img_size, img_size, boxes, labels)

            with ThreadPoolExecutor(_workers()) as pool:  # numpy and Pillow release the GIL
                splits[split] = list(pool.map(make, range(count)))
            file_names[split] = [r.image_path.name for r in splits[split]]
        from cnnkit.data.builtin import FASHION_MNIST_NAMES
        data = DetectionSplits(names=list(FASHION_MNIST_NAMES), splits=splits, format="yolo", root=out_dir)
        comment = (f"cnnkit {VERSION}: Fashion-MNIST items on real backgrounds, generated with\n"
                   + json.dumps(p, sort_keys=True) + "\nmasks/<split>/*.png: 0 = background, class id + 1 = item")
        write_yolo_labels(tmp, data, file_names, comment=comment)
        write_coco_json(tmp, data, file_names)
    return out_dir


def scenes_dir(**params) -> Path:
    """Where `ensure_scenes(**params)` keeps its scenes: $CNNKIT_DATA or ~/.cache/cnnkit, then
    scenes-v1-<hash of the parameters and the background files>."""
    p = {**DEFAULTS, **params}
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"unknown scene parameters {sorted(unknown)}", fix=f"use {', '.join(DEFAULTS)}")
    h = hashlib.sha1(json.dumps(p, sort_keys=True).encode())
    for f in background_files():
        h.update(f.name.encode() + f.read_bytes())
    base = Path(os.environ["CNNKIT_DATA"]) if os.environ.get("CNNKIT_DATA") else Path("~/.cache/cnnkit")
    return base.expanduser() / f"{VERSION}-{h.hexdigest()[:12]}"


def ensure_scenes(**params) -> Path:
    """The folder of the scenes with these parameters (defaults: `DEFAULTS`), generated on first use."""
    root = scenes_dir(**params)
    if (root / "data.yaml").is_file():
        return root
    try:
        p = {**DEFAULTS, **params}
        settings = SceneSettings(**{k: p.pop(k) for k in SETTING_NAMES})
        generate_scenes(root, settings=settings, **p)
    except OSError as exc:
        if (root / "data.yaml").is_file():  # another process finished first
            return root
        raise DataError(f"cannot write the generated scenes: {exc.strerror or exc}", path=str(root),
                        fix="set CNNKIT_DATA to a writable folder") from None
    except DataError:
        if (root / "data.yaml").is_file():
            return root
        raise
    return root


SCENES_MARK = "# cnnkit scenes-"


def is_scenes_dir(root: str | os.PathLike) -> bool:
    """True when `root` holds scenes written by `generate_scenes` (its data.yaml starts with the mark)."""
    f = Path(root) / "data.yaml"
    try:
        with open(f, encoding="utf-8") as fh:
            return fh.readline().startswith(SCENES_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def masks_dir(root: str | os.PathLike, split: str) -> Path:
    """The folder of a split's index masks: masks/<split>/<image stem>.png."""
    return Path(root) / "masks" / split


def segmentation_names(root: str | os.PathLike) -> list[str]:
    """Class names indexed by mask value: "background" (0), then the item classes (class id + 1)."""
    from cnnkit.data.config import read_data_yaml

    cfg = read_data_yaml(Path(root) / "data.yaml")
    if not cfg.names:
        raise DataError("the scenes' data.yaml lists no names", path=str(Path(root) / "data.yaml"),
                        fix="delete the folder so that it is generated again")
    return ["background", *cfg.names]
