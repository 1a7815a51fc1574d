"""YOLO's batch augmentation (`cnnkit.tasks.detect.BoxAugment`) against torchvision's own transforms:
the same pixels and boxes for the same parameters, the parameters drawn as the paper says, and the
task applying it in training only."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cnnkit.tasks.detect import BoxAugment, DetectTask

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _scene(n: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    targets = []
    for i in range(n):
        k = 1 + i % 3
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 3 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.arange(k), "image_id": i})
    return images, targets


def _reference(image, boxes, p, i):
    """torchvision: RandomAffine's affine (nearest), the flip, brightness then saturation, clamp, sanitise."""
    h, w = image.shape[-2:]
    im = tv_tensors.Image(image.float() / 255)
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    args = dict(angle=0.0, translate=[float(p["tx"][i]), float(p["ty"][i])], scale=float(p["s"][i]), shear=[0.0, 0.0])
    im, bb = TF.affine(im, interpolation=v2.InterpolationMode.NEAREST, **args), TF.affine(bb, **args)
    if p["flip"][i]:
        im, bb = TF.horizontal_flip(im), TF.horizontal_flip(bb)
    im = TF.adjust_saturation(TF.adjust_brightness(im, float(p["brightness"][i])), float(p["saturation"][i]))
    bb = TF.clamp_bounding_boxes(bb).as_subclass(torch.Tensor)
    keep = ((bb[:, 2] - bb[:, 0]) >= 2) & ((bb[:, 3] - bb[:, 1]) >= 2)
    return im.as_subclass(torch.Tensor), bb[keep], keep


@pytest.mark.parametrize("h, w, norm", [(40, 48, "unit"), (33, 27, "imagenet")])
def test_pixels_and_boxes_equal_torchvision_for_the_same_parameters(h, w, norm):
    mean, std = ((0.0,) * 3, (1.0,) * 3) if norm == "unit" else (MEAN, STD)
    images, targets = _scene(8, h, w)
    aug = BoxAugment()
    torch.manual_seed(1)
    p = aug.draw(8, h, w)
    p["flip"][:4] = torch.tensor([True, False, True, False])  # both kinds seen whatever the draw
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (images.float() / 255 - m) / s
    before = [dict(t, boxes=t["boxes"].clone()) for t in targets]
    out, moved = aug(x, targets, mean, std, params=p)
    assert out.shape == x.shape and torch.equal(x, (images.float() / 255 - m) / s)  # the input is untouched
    for i in range(8):
        ref_im, ref_boxes, keep = _reference(images[i], targets[i]["boxes"], p, i)
        ours = out[i:i + 1] * s + m
        assert torch.allclose(ours[0], ref_im, atol=2e-6), (i, float((ours[0] - ref_im).abs().max()))
        assert torch.allclose(moved[i]["boxes"], ref_boxes, atol=1e-4)
        assert torch.equal(moved[i]["labels"], targets[i]["labels"][keep]) and moved[i]["image_id"] == i
        assert torch.equal(targets[i]["boxes"], before[i]["boxes"])


def test_parameters_are_drawn_as_the_paper_says():
    torch.manual_seed(0)
    p = BoxAugment().draw(20000, 160, 120)
    assert 0.8 <= float(p["s"].min()) and float(p["s"].max()) <= 1.2
    assert torch.equal(p["tx"], p["tx"].round()) and float(p["tx"].abs().max()) <= 0.2 * 120
    assert float(p["ty"].abs().max()) <= 0.2 * 160 and float(p["ty"].abs().max()) > 0.19 * 160
    assert 0.48 < float(p["flip"].float().mean()) < 0.52
    for k in ("brightness", "saturation"):
        assert 1 / 1.5 <= float(p[k].min()) and float(p[k].max()) <= 1.5


def test_boxes_that_leave_the_image_are_clipped_or_dropped_and_images_without_boxes_pass():
    aug = BoxAugment()
    p = {"s": torch.tensor([1.0, 1.0]), "tx": torch.tensor([30.0, 0.0]), "ty": torch.tensor([0.0, 0.0]),
         "flip": torch.tensor([False, True]), "brightness": torch.ones(2), "saturation": torch.ones(2)}
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [25.0, 5.0, 39.0, 15.0]]), "labels": torch.tensor([3, 4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    _, moved = aug(torch.zeros(2, 3, 20, 40), targets, (0.0,) * 3, (1.0,) * 3, params=p)
    assert torch.equal(moved[0]["boxes"], torch.tensor([[30.0, 0.0, 40.0, 10.0]]))  # the second one left: dropped
    assert torch.equal(moved[0]["labels"], torch.tensor([3]))
    assert moved[1]["boxes"].shape == (0, 4)


def test_the_task_augments_in_training_only_and_keeps_channels_last():
    task = DetectTask()
    task.mean, task.std = MEAN, STD
    task.geometry = {"S": 2, "B": 1, "img_size": 32}
    task.batch_augment = BoxAugment()
    seen = []

    class Probe(torch.nn.Module):
        S, B, num_classes, img_size = 2, 1, 3, 32

        def forward(self, x):
            seen.append(x.clone())
            return x.mean() + torch.zeros(x.shape[0], 2, 2, 8)

    images, targets = _scene(4, 32, 32)
    x = ((images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    x = x.contiguous(memory_format=torch.channels_last)
    targets = [{"boxes": t["boxes"], "labels": t["labels"] % 3} for t in targets]
    task.loss(Probe().eval(), x, targets)
    assert torch.equal(seen[-1], x)
    torch.manual_seed(5)
    task.loss(Probe().train(), x, targets)
    assert not torch.equal(seen[-1], x) and seen[-1].is_contiguous(memory_format=torch.channels_last)
