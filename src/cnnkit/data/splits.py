"""The train / val split every reader uses when a source has no validation part.

Each item is ranked by the SHA-1 of a stable key (the file path relative to the root, or the item's
index in an IDX file) and the first round(0.2 n) go to val: per class for classification
(`stratified_split`), over all images for detection and segmentation. The split is the same on every
machine and run, and adding one file moves at most one other file between train and val.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

VAL_FRACTION = 0.2
SPLIT_SALT = "cnnkit-split-v1"


def split_rank_key(key: str) -> bytes:
    """The rank of an item with stable key `key`: items with the lowest ranks go to val."""
    return hashlib.sha1(f"{SPLIT_SALT}:{key}".encode()).digest()


def stratified_split(labels: Sequence[int], keys: Sequence[str],
                     val_fraction: float = VAL_FRACTION) -> tuple[list[int], list[int]]:
    """Indices (train, val), each ascending: per class, the round(val_fraction * n) items whose keys
    hash lowest go to val (a class with one item keeps it in train)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    val: list[int] = []
    for members in by_class.values():
        n_val = int(len(members) * val_fraction + 0.5) if len(members) > 1 else 0
        ranked = sorted(members, key=lambda i: split_rank_key(keys[i]))
        val.extend(ranked[:n_val])
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)
