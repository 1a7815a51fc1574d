"""Decoding image files into uint8 tensors [3, H, W], one at a time or a whole dataset at once.

Every image becomes 3-channel 8-bit RGB, whatever its mode:

* EXIF orientation is applied first (`ImageOps.exif_transpose`), so the tensor is what a viewer shows.
* Transparency (RGBA, LA, PA, palette or grey images with a transparent colour) is composited on
  white: out = (rgb * a + 255 * (255 - a)) / 255. Dropping alpha would expose whatever colour the
  writer left under fully transparent pixels (often black, sometimes garbage).
* 16-bit grey ('I;16', 'I;16B', 'I;16L') maps v -> round(v / 257), so 65535 -> 255 and 257*k -> k.
  32-bit 'I' images whose values lie in 0..65535 are treated the same way (Pillow opens some 16-bit
  files as 'I'); other 'I' images, and float 'F' images outside [0, 1], are scaled linearly from their
  own min..max to 0..255 (never clipped). 'F' images within [0, 1] map v -> round(255 v).
* CMYK, palette, 1-bit, grey and YCbCr images go through Pillow's conversion to RGB.

`decode_many` decodes a list of files with a thread pool (Pillow's decoders release the GIL) into one
flat uint8 buffer when the decoded size, estimated from the file headers alone, is below a limit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import DataError
from cnnkit.utils import usable_cpus

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_CACHE_BYTES = 2 * 1024**3
BAD_IMAGE_FIX = "replace or delete the file, or load with on_bad_image='skip' (CLI: --on-bad-image skip)"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name ends with a supported image extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _scale_range(a: np.ndarray) -> np.ndarray:
    """Map an array linearly from its own min..max onto 0..255 (a constant image becomes 0)."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _high_depth_grey_to_uint8(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as uint8 [H, W] (rules in the module docstring)."""
    a = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    if img.mode == "I":
        if a.min() >= 0 and a.max() <= 65535:
            return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
        return _scale_range(a)
    # mode "F"
    if not np.isfinite(a).all():
        raise ValueError("float image holds NaN or infinite values")
    if a.min() >= 0.0 and a.max() <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    return _scale_range(a)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow image (already loaded and oriented) as a C-contiguous uint8 array [H, W, 3]."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _high_depth_grey_to_uint8(img)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(np.asarray(img.convert("RGBA")))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, copy=True)


def check_pixel_limit(img: Image.Image) -> None:
    """Refuse an image whose header declares more pixels than Pillow's `Image.MAX_IMAGE_PIXELS`
    (89.5 M by default) before any pixel is decoded: Pillow itself only warns between 1x and 2x that
    limit, and a small file can declare a huge image (a decompression bomb)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ValueError(f"image of {w}x{h} = {w * h:,} pixels is above the decompression-bomb limit of "
                         f"{limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)")


def _load_oriented(path: str) -> Image.Image:
    """Open, decode fully (so truncation shows), apply EXIF orientation; the result owns its pixels."""
    with Image.open(path) as img:
        check_pixel_limit(img)
        img.load()
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block must not cost the pixels: keep them unrotated
            oriented = None
        if oriented is None or oriented is img:
            oriented = img.copy()
        return oriented


def _array_or_reason(path: str) -> tuple[np.ndarray | None, str]:
    try:
        return pil_to_rgb_array(_load_oriented(path)), ""
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals a bad file with many exception types
        return None, _reason(exc)


def _size_or_reason(path: str) -> tuple[tuple[int, int] | None, str]:
    try:
        with Image.open(path) as img:
            check_pixel_limit(img)
            return img.size, ""
    except MemoryError:
        raise
    except Exception as exc:
        return None, _reason(exc)


def decode_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image file into a uint8 tensor [3, H, W]; a bad file raises DataError naming it."""
    path = os.fspath(path)
    array, reason = _array_or_reason(path)
    if array is None:
        raise DataError(f"cannot decode image: {reason}", path=path, fix=BAD_IMAGE_FIX)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = os.fspath(path)
    size, reason = _size_or_reason(path)
    if size is None:
        raise DataError(f"cannot read image: {reason}", path=path, fix=BAD_IMAGE_FIX)
    return size


def _pool_size() -> int:
    return max(1, min(16, usable_cpus()))


@dataclass
class DecodedImages:
    """The outcome of `decode_many`.

    `ok[i]` tells whether file i is usable; `bad` lists (path, reason) of the others, in input order.
    When `pixels` is not None, image i is `pixels[offsets[i] : offsets[i] + 3*h*w].view(3, h, w)` with
    (h, w) = `shapes[i]`; when it is None the files are to be decoded lazily.
    """

    ok: list[bool]
    bad: list[tuple[str, str]] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    shapes: torch.Tensor | None = None


def decode_many(paths: Sequence[str], *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                progress: bool = True) -> DecodedImages:
    """Read every header; if the decoded size (3*H*W bytes each) totals at most `cache_bytes`, decode
    all files with a thread pool into one buffer, else only check the headers (lazy decoding)."""
    n = len(paths)
    sizes: list[tuple[int, int] | None] = [None] * n
    bad: dict[int, str] = {}

    def header(i: int) -> None:
        sizes[i], reason = _size_or_reason(paths[i])
        if sizes[i] is None:
            bad[i] = reason

    workers = _pool_size()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(header, range(n)))
    nbytes = [3 * s[0] * s[1] if s is not None else 0 for s in sizes]
    total = sum(nbytes)
    result = DecodedImages(ok=[])
    if total <= cache_bytes:
        offsets = np.zeros(n, np.int64)
        if n:
            offsets[1:] = np.cumsum(nbytes[:-1])
        pixels = torch.empty(total, dtype=torch.uint8)
        shapes = torch.zeros(n, 2, dtype=torch.int64)

        def decode(i: int) -> None:
            if i in bad:
                return
            array, reason = _array_or_reason(paths[i])
            if array is None:
                bad[i] = reason
                return
            h, w = array.shape[:2]
            if 3 * h * w != nbytes[i]:  # cannot happen for a sane file; guards the shared buffer
                bad[i] = f"decoded size {w}x{h} differs from the header's {sizes[i][0]}x{sizes[i][1]}"
                return
            start = int(offsets[i])
            pixels[start:start + nbytes[i]].view(3, h, w).copy_(torch.from_numpy(array).permute(2, 0, 1))
            shapes[i, 0], shapes[i, 1] = h, w

        bar = None
        if progress and n >= 5000:
            from tqdm import tqdm
            bar = tqdm(total=n, desc="decoding images", unit="img", leave=False)
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(decode, range(n)):
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        result.pixels, result.offsets, result.shapes = pixels, torch.from_numpy(offsets), shapes
    result.ok = [i not in bad for i in range(n)]
    result.bad = [(paths[i], bad[i]) for i in sorted(bad)]
    return result


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Decoded RGB uint8 [3,H,W] -> `channels` channels (ITU-R 601 luma for grey)."""
    if channels == 3 or img.shape[0] == channels:
        return img
    if channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (img.float() * w).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {img.shape[0]} channels to {channels}")


def square_batch(paths, size: int, channels: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decode image files -> (the decoded uint8 originals, a uint8 batch [N,C,size,size] of them resized)."""
    from torchvision.transforms import v2

    originals = [to_channels(decode_image(p), channels) for p in paths]
    batch = torch.stack([v2.functional.resize(im, [size, size], antialias=True) for im in originals])
    return originals, batch
