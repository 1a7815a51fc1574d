"""Semantic segmentation metrics (Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks",
section 5) from a pixel confusion matrix, and pictures of masks.

With n_ij the number of pixels of true class i predicted as class j, t_i = sum_j n_ij the pixels of
class i, and p_j = sum_i n_ij the pixels predicted as j:

    IoU_i               = n_ii / (t_i + p_i - n_ii)
    mIoU                = mean of IoU_i over the classes present (t_i + p_i > 0)
    pixel accuracy      = sum_i n_ii / sum_i t_i
    mean accuracy       = mean of n_ii / t_i over the classes in the truth (t_i > 0)
    frequency weighted  = sum_i t_i IoU_i / sum_i t_i

Pixels whose truth is the ignore index (255, the VOC border) are left out of the matrix. A class
absent from both truth and prediction has no IoU (None) and is left out of the means, so the score
of a batch does not depend on which classes the dataset happens to have elsewhere.

Colours follow the Pascal VOC palette: class c gets the colour whose red, green and blue bits are
the bits of c read three at a time, most significant colour bit first (`voc_palette`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cnnkit.errors import ShapeError

IGNORE_INDEX = 255
IGNORE_COLOR = (255, 255, 255)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel confusion matrix int64 [C, C] (rows: true class, columns: predicted class) on the
    device of the inputs. `pred` and `target` hold class indices, any (equal) shape; pixels whose
    target is `ignore_index` are left out. A class index outside 0..C-1 raises ValueError."""
    if pred.shape != target.shape:
        raise ShapeError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape",
                         fix="compare the argmax over classes [N, H, W] with the masks [N, H, W]")
    c = int(num_classes)
    t = target.reshape(-1).to(torch.int64)
    p = pred.reshape(-1).to(device=t.device, dtype=torch.int64)
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    valid = (t >= 0) & (t < c) & (p >= 0) & (p < c)
    # one bin past the matrix counts the out-of-range pairs, so checking them costs one sync
    index = torch.where(valid, t * c + p, torch.full_like(t, c * c))
    counts = torch.bincount(index, minlength=c * c + 1)
    bad = int(counts[c * c])
    if bad:
        raise ValueError(f"{bad} pixels hold a class index outside 0..{c - 1} (and not the ignore index "
                         f"{ignore_index}) in the predictions or the targets")
    return counts[:c * c].reshape(c, c)


def segmentation_scores(cm, names: Sequence[str]) -> dict:
    """mIoU, per-class IoU, pixel accuracy, mean accuracy and frequency-weighted IoU of a confusion
    matrix (formulas in the module docstring). `per_class_IoU[name]` is None for a class absent from
    truth and prediction. A matrix without pixels (everything ignored) scores 0.0; `pixels` says how
    many pixels were counted."""
    m = (cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ShapeError(f"confusion matrix of shape {m.shape} for {len(names)} class names",
                         fix="give a square [C, C] matrix and the C class names")
    tp = np.diag(m)
    truth, predicted = m.sum(axis=1), m.sum(axis=0)
    union = truth + predicted - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    total = float(truth.sum())
    in_truth = truth > 0
    if total == 0:
        return {"mIoU": 0.0, "per_class_IoU": {str(n): None for n in names}, "pixel_accuracy": 0.0,
                "mean_accuracy": 0.0, "frequency_weighted_IoU": 0.0, "pixels": 0}
    accuracy = np.divide(tp, truth, out=np.zeros_like(tp), where=in_truth)
    return {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_IoU": {str(n): (float(iou[i]) if present[i] else None) for i, n in enumerate(names)},
        "pixel_accuracy": float(tp.sum() / total),
        "mean_accuracy": float(accuracy[in_truth].mean()),
        "frequency_weighted_IoU": float((truth * iou).sum() / total),
        "pixels": int(total),
    }


def plot_segmentation_confusion(cm, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised pixel confusion matrix as a PNG (written atomically). Cells show the percentage
    of the true class's pixels, since raw pixel counts run to millions."""
    from cnnkit.plots import plot_confusion

    m = (cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)).astype(np.float64)
    percent = np.rint(100 * m / np.maximum(m.sum(axis=1, keepdims=True), 1)).astype(np.int64)
    return plot_confusion(percent, list(names), Path(path),
                          title=title or "pixel confusion matrix (% of each true class)")


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The first n colours of the Pascal VOC palette: bit 3k, 3k+1, 3k+2 of the class index become
    bit 7-k of red, green and blue (0 black, 1 dark red, 2 dark green, 3 olive, 4 dark blue, ...)."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


def colorize_mask(mask: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A mask of class indices [H, W] (or [N, H, W]) as a uint8 colour image [3, H, W] ([N, 3, H, W]):
    VOC palette colours, white where the mask holds `ignore_index`."""
    c = int(num_classes)
    mask = mask.as_subclass(torch.Tensor).to(torch.int64)
    lut = torch.tensor(voc_palette(c) + [IGNORE_COLOR], dtype=torch.uint8, device=mask.device)
    ignored = mask == ignore_index
    if bool(((mask < 0) | (mask >= c))[~ignored].any()):
        raise ValueError(f"the mask holds values outside 0..{c - 1} that are not the ignore index {ignore_index}")
    index = torch.where(ignored, torch.full_like(mask, c), mask)
    return lut[index].movedim(-1, -3).contiguous()


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5, *, num_classes: int | None = None,
            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The image uint8 [3, H, W] with every non-background class of `mask` [H, W] blended in its VOC
    colour (out = (1 - alpha) image + alpha colour); class 0 (background) and ignored pixels keep the
    image's own pixels. Drawn by torchvision.utils.draw_segmentation_masks."""
    from torchvision.utils import draw_segmentation_masks

    image = image.as_subclass(torch.Tensor)
    mask = mask.as_subclass(torch.Tensor).to(device=image.device, dtype=torch.int64)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8 or mask.shape != image.shape[1:]:
        raise ShapeError(f"overlay needs a uint8 image [3, H, W] and a mask [H, W], got {image.dtype} "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}", fix="pass one image and its mask")
    classes = [int(v) for v in torch.unique(mask).tolist() if v != ignore_index and v > 0]
    if num_classes is not None and any(v >= num_classes for v in classes):
        raise ValueError(f"the mask holds values >= {num_classes} that are not the ignore index {ignore_index}")
    if not classes:
        return image.clone()
    palette = voc_palette(max(classes) + 1)
    wanted = torch.tensor(classes, device=mask.device)
    masks = mask.unsqueeze(0) == wanted[:, None, None]
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[palette[v] for v in classes])
