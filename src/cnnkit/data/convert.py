"""`cnnkit data convert SRC DST --to {yolo,coco,voc}`: read a detection dataset in any format,
write it in another. Boxes go through cnnkit's one in-memory form (XYXY pixels), so every pair of
formats converts the same way; images are hard-linked where possible, else copied."""

from __future__ import annotations

import os

from cnnkit.data.formats import FORMATS, read_any, summarize_problems
from cnnkit.errors import UsageError


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, on_bad_label: str = "error",
            link: bool = True) -> str:
    """Convert `src` (format detected) into `dst` (new or empty folder) as `to`; returns a summary."""
    if to not in FORMATS:
        raise UsageError(f"unknown output format {to!r}", fix=f"use one of {', '.join(FORMATS)}")
    data = read_any(src, on_bad_label=on_bad_label)
    FORMATS[to].write(data, dst, link=link)
    lines = [f"{data.format} -> {to}: {data.describe()}; written to {dst}"]
    lines += data.notes
    if data.problems:
        lines.append(summarize_problems(data.problems))
    return "\n".join(lines)
