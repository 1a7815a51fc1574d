"""Turning command-line sources (image files and folders) into a list of image paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from cnnkit.data.images import is_image_file
from cnnkit.errors import DataError


def collect_image_paths(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders searched recursively (sorted); a missing path or no image is an error."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                raise DataError("no images (jpg, png, bmp, webp) in this folder", path=str(p))
            out += found
        elif p.is_file():
            if not is_image_file(p):
                raise DataError("not an image file (jpg, png, bmp, webp)", path=str(p))
            out.append(p)
        else:
            raise DataError("no such file or folder", path=str(p), fix="check the path")
    return out
