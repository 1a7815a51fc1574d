"""What every classification reader returns: `ClassificationData`, train and val datasets of
(uint8 image [C, H, W], int label), held in memory (`TensorImageDataset`) or as image files
(`ImageFileDataset`). The readers (`builtin`, `idx`, `imagefolder`) build on this module and
`cnnkit.data.classification` chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from cnnkit.data.images import decode_image


class TensorImageDataset(Dataset):
    """Images already in memory: `images` uint8 [N, C, H, W], `labels` int64 [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index].clone()  # a clone: a transform can never alter the dataset
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A loader's whole batch at once (torch's DataLoader calls this when it exists): one gather and,
        when the transform says it treats a batch as each of its images (`batchable`, e.g. the fixed
        fit-to-size of evaluation and of small training images), one transform call, instead of one
        of each per image (about 1 ms of a 40 ms training step at batch 64 on two cores). The same items
        `__getitem__` gives, in the same order; a random per-image transform is applied per image."""
        if self.transform is not None and not getattr(self.transform, "batchable", False):
            return [self[i] for i in indices]
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index]  # a copy (advanced indexing): a transform can never alter the dataset
        if self.transform is not None:
            images = self.transform(images)
        return list(zip(images.unbind(0), self.labels[index].tolist()))


class ImageFileDataset(Dataset):
    """Image files, 3-channel uint8 [3, H, W] each, either decoded once into one flat buffer
    (`pixels`, `offsets`, `shapes`, see `decode_many`) or decoded from `paths` in `__getitem__`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], *, pixels: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, shapes: torch.Tensor | None = None,
                 transform: Callable | None = None):
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.pixels, self.offsets, self.shapes = pixels, offsets, shapes
        self.transform = transform

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.pixels is None:
            image = decode_image(self.paths[index])
        else:
            h, w = (int(v) for v in self.shapes[index])
            start = int(self.offsets[index])
            image = self.pixels[start:start + 3 * h * w].view(3, h, w).clone()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


@dataclass
class ClassificationData:
    """Train and val datasets with what a classifier needs to know about them.

    `names[label]` is the class name; `channels` is 1 for grey sources (IDX), 3 otherwise; `source`
    describes the data in a line; `skipped` lists (path, reason) of images left out with
    on_bad_image="skip"; `notes` holds remarks worth printing (ignored files, how val was made);
    `in_memory` tells whether every image is already decoded; `test_dir` is a test folder that the
    source names but that is not loaded.
    """

    train: Dataset
    val: Dataset
    names: list[str]
    channels: int
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    in_memory: bool = True
    test_dir: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)
