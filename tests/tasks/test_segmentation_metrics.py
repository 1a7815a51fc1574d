"""Segmentation metrics against hand-computed numbers and a per-pixel loop; mask colouring."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from cnnkit.tasks.segmentation_metrics import (colorize_mask, confusion_matrix, overlay, plot_segmentation_confusion,
                                               segmentation_scores, voc_palette)

NAMES = ["background", "cat", "dog", "bird"]

# 4 classes; "dog" (2) is in neither truth nor prediction; three pixels are ignored (255)
TARGET = torch.tensor([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [3, 3, 255, 255],
                       [3, 0, 1, 255]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [0, 0, 1, 0],
                     [3, 0, 3, 1],
                     [3, 0, 3, 0]])
# counted by hand, pixel by pixel (rows: truth, columns: prediction)
CM = [[4, 1, 0, 0],
      [1, 3, 0, 1],
      [0, 0, 0, 0],
      [1, 0, 0, 2]]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.dtype == torch.int64 and cm.tolist() == CM
    # batched and any shape: the same pixels in [2, 8] or [1, 1, 4, 4] give the same matrix
    assert confusion_matrix(PRED.reshape(2, 8), TARGET.reshape(2, 8), 4).tolist() == CM
    assert confusion_matrix(PRED[None, None], TARGET[None, None], 4).tolist() == CM


def test_scores_by_hand():
    s = segmentation_scores(torch.tensor(CM), NAMES)
    # IoU = tp / (truth + predicted - tp): background 4/(5+6-4), cat 3/(5+4-3), bird 2/(3+3-2)
    assert s["per_class_IoU"]["background"] == pytest.approx(4 / 7)
    assert s["per_class_IoU"]["cat"] == pytest.approx(0.5)
    assert s["per_class_IoU"]["bird"] == pytest.approx(0.5)
    assert s["per_class_IoU"]["dog"] is None  # absent from both: no IoU, left out of the mean
    assert s["mIoU"] == pytest.approx((4 / 7 + 0.5 + 0.5) / 3)  # = 11/21, not divided by 4
    assert s["pixel_accuracy"] == pytest.approx(9 / 13)
    assert s["mean_accuracy"] == pytest.approx((4 / 5 + 3 / 5 + 2 / 3) / 3)
    assert s["frequency_weighted_IoU"] == pytest.approx((5 * 4 / 7 + 5 * 0.5 + 3 * 0.5) / 13)
    assert s["pixels"] == 13


def test_class_only_predicted_counts_in_miou():
    # class 2 never in the truth but predicted once: IoU 0, in the mean; not in mean accuracy
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    s = segmentation_scores(confusion_matrix(pred, target, 3), ["a", "b", "c"])
    assert s["per_class_IoU"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["mean_accuracy"] == pytest.approx(0.75)


def test_absent_class_does_not_change_miou():
    """Adding classes that appear nowhere leaves every score as it was."""
    small = segmentation_scores(confusion_matrix(PRED, TARGET, 4), NAMES)
    big = segmentation_scores(confusion_matrix(PRED, TARGET, 7), NAMES + ["x", "y", "z"])
    for key in ("mIoU", "pixel_accuracy", "mean_accuracy", "frequency_weighted_IoU"):
        assert big[key] == pytest.approx(small[key])
    assert big["per_class_IoU"]["z"] is None


def test_confusion_matrix_matches_a_pixel_loop():
    g = torch.Generator().manual_seed(0)
    c = 5
    target = torch.randint(0, c, (3, 17, 13), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.15] = 255
    pred = torch.randint(0, c, (3, 17, 13), generator=g)
    expected = [[0] * c for _ in range(c)]
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t][p] += 1
    assert confusion_matrix(pred, target, c).tolist() == expected
    # uint8 masks and another ignore index
    t2 = target.clone()
    t2[t2 == 255] = 7
    assert confusion_matrix(pred.to(torch.uint8), t2.to(torch.uint8), c, ignore_index=7).tolist() == expected


def test_all_ignored():
    target = torch.full((2, 4, 4), 255)
    cm = confusion_matrix(torch.zeros_like(target), target, 3)
    assert cm.sum() == 0 and cm.shape == (3, 3)
    s = segmentation_scores(cm, ["a", "b", "c"])
    assert s["pixels"] == 0 and s["mIoU"] == 0.0 and s["pixel_accuracy"] == 0.0
    assert s["per_class_IoU"] == {"a": None, "b": None, "c": None}
    assert all(math.isfinite(s[k]) for k in ("mIoU", "pixel_accuracy", "mean_accuracy", "frequency_weighted_IoU"))


def test_out_of_range_and_shape_errors():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 3)
    with pytest.raises(ValueError, match="class names"):
        segmentation_scores(torch.tensor(CM), NAMES[:3])


def test_voc_palette():
    p = voc_palette()
    assert len(p) == 256 and len(set(p)) == 256
    # the first colours of the Pascal VOC palette, and its last (the colour VOC gives the 255 border)
    assert p[:6] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]
    assert p[15] == (192, 128, 128) and p[20] == (0, 64, 128) and p[255] == (224, 224, 192)


def test_colorize_mask():
    mask = torch.tensor([[0, 1], [2, 255]])
    rgb = colorize_mask(mask, 3)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 2, 2)
    assert rgb[:, 0, 1].tolist() == [128, 0, 0] and rgb[:, 1, 1].tolist() == [255, 255, 255]
    assert rgb[:, 0, 0].tolist() == [0, 0, 0] and rgb[:, 1, 0].tolist() == [0, 128, 0]
    batch = colorize_mask(torch.stack([mask, mask]), 3)
    assert batch.shape == (2, 3, 2, 2) and torch.equal(batch[1], rgb)
    with pytest.raises(ValueError):
        colorize_mask(torch.tensor([[3]]), 3)


def test_overlay():
    image = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    mask = torch.zeros(4, 5, dtype=torch.int64)
    mask[1, 2] = 1
    mask[3, 4] = 255
    out = overlay(image, mask, alpha=0.5)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 5)
    assert out[:, 1, 2].tolist() == pytest.approx([114, 50, 50], abs=1)  # (100 + (128, 0, 0)) / 2
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(out[:, keep], image[:, keep])  # background and ignored pixels untouched
    assert torch.equal(overlay(image, torch.zeros(4, 5, dtype=torch.int64)), image)


def test_plot_segmentation_confusion(tmp_path):
    path = plot_segmentation_confusion(torch.tensor(CM) * 100_000, NAMES, tmp_path / "cm.png")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with Image.open(path) as img:
        assert img.size[0] > 100
