"""YOLO v1 targets, loss and inference: Redmon, Divvala, Girshick & Farhadi, "You Only Look Once:
Unified, Real-Time Object Detection", CVPR 2016.

Everything here works on the raw model output `pred` of shape [N, S, S, 5B + C] (`cnnkit.models.yolo`):
per cell (row i, column j), B groups (x, y, sqrt w, sqrt h, C), then C class scores. `split_output` is
the one place that reads them (the loss and inference both call it). As in the paper, whose last layer
is linear, the box values are used as they come out:

    x, y             centre offset inside the cell (target in [0, 1])
    sqrt(w), sqrt(h) square roots of width and height relative to the image (targets in [0, 1]); the
                     network predicts the roots, so the loss needs no sqrt of a prediction
    C_hat            confidence, Pr(Object) * IoU(pred, truth) (target in [0, 1])
    p_hat(c)         softmax of the class scores: Pr(Class_c | Object), one distribution per cell

The squared-error loss on these raw values has a gradient 2 (prediction - target) that never
vanishes; a sigmoid in front of a squared error saturates (an overfit run left predictors stuck at
sigmoid 1e-9 with a zero gradient), which is why none is used. Boxes and scores are read through
`YoloOutput.boxes()` / `.confidence()`, which clamp x, y, sqrt w, sqrt h and C to [0, 1]: the geometry
the IoU of the loss and the detections of inference both use. A box's centre in image-relative units
is ((j + x) / S, (i + y) / S).

Targets (`encode_targets`): [N, S, S, 5 + C] holding, for the cell that contains a box's centre,
(x, y, w, h, 1, one-hot class) with x, y the centre offset in the cell and w, h relative to the image;
zeros elsewhere. A cell holds at most one object (the paper's model predicts one class per cell):
when several boxes' centres fall in one cell, the one with the largest area is kept (equal areas:
the first listed); the others are dropped.

Loss (`yolo_loss`, Section 2.2), summed over the S^2 cells i and B predictors j, divided by the batch
size N:

    lambda_coord sum_i sum_j 1obj_ij [(x_i - x^_i)^2 + (y_i - y^_i)^2]
  + lambda_coord sum_i sum_j 1obj_ij [(sqrt(w_i) - sqrt(w^_i))^2 + (sqrt(h_i) - sqrt(h^_i))^2]
  + sum_i sum_j 1obj_ij (C_i - C^_i)^2
  + lambda_noobj sum_i sum_j 1noobj_ij (C_i - C^_i)^2
  + sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2

1obj_i: an object's centre lies in cell i. 1obj_ij: predictor j of that cell is "responsible" for it,
having the highest IoU with the truth among the cell's B predictors (when none overlaps it at all,
the one with the smallest squared error of (x, y, sqrt w, sqrt h), the rule of the authors' darknet
code). The confidence target C_i is that IoU (detached: a target, not a path for gradients);
1noobj_ij = 1 - 1obj_ij covers every other predictor, in cells with and without objects, with target
0. lambda_coord = 5, lambda_noobj = 0.5. `class_loss="ce"` replaces the last term by the
cross-entropy of the class scores (an option, not the paper).

Inference (`postprocess`): class-specific confidence Pr(Class_c | Object) * Pr(Object) * IoU = p^(c) *
C^ per box and class (Section 2, eq. 1), threshold, per-class non-maximum suppression
(torchvision.ops.batched_nms), at most `max_det` detections per image.

Boxes outside the model are XYXY absolute pixels (cnnkit's convention); `img_size` is an int (square)
or (height, width).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from cnnkit.errors import DataError, ShapeError, UsageError
from cnnkit.tasks.base import at_least_fp32

BOX_VALUES = 5  # x, y, sqrt w, sqrt h, confidence per predictor
TARGET_VALUES = 5  # x, y, w, h, objectness before the one-hot class


class YoloOutput(NamedTuple):
    """The model output split into its parts (`split_output`); grid shape [N, S, S]."""

    xy: torch.Tensor  # [N, S, S, B, 2] raw centre offset in the cell
    sqrt_wh: torch.Tensor  # [N, S, S, B, 2] raw sqrt of width, height relative to the image
    conf: torch.Tensor  # [N, S, S, B] raw confidence
    class_logits: torch.Tensor  # [N, S, S, C] raw class scores
    class_probs: torch.Tensor  # [N, S, S, C] softmax of class_logits

    def boxes(self) -> torch.Tensor:
        """XYXY boxes relative to the image, [N, S, S, B, 4], from the values clamped to [0, 1]."""
        return cell_boxes(self.xy.clamp(0, 1), self.sqrt_wh.clamp(0, 1).square(), self.xy.shape[1])

    def confidence(self) -> torch.Tensor:
        """Confidences clamped to [0, 1], [N, S, S, B]."""
        return self.conf.clamp(0, 1)


def _hw(img_size) -> tuple[float, float]:
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2:
            raise UsageError(f"img_size must be an int or (height, width), got {img_size!r}")
        h, w = img_size
    else:
        h = w = img_size
    if not (float(h) > 0 and float(w) > 0):
        raise UsageError(f"img_size must be positive, got {img_size!r}")
    return float(h), float(w)




def _check_pred(pred: torch.Tensor, S: int, B: int, C: int | None) -> int:
    """The class count of `pred`, after checking its shape [N, S, S, 5B + C]."""
    if pred.dim() != 4 or pred.shape[1] != S or pred.shape[2] != S:
        raise ShapeError(f"YOLO predictions must be [N, S, S, 5B + C] with S = {S}, got {tuple(pred.shape)}",
                         fix="pass the model's S (model.S) and its raw output")
    classes = pred.shape[-1] - BOX_VALUES * B
    if classes < 1 or (C is not None and classes != C):
        want = f"5B + C = {BOX_VALUES * B + C}" if C is not None else f"more than 5B = {BOX_VALUES * B}"
        raise ShapeError(f"YOLO predictions have {pred.shape[-1]} values per cell, expected {want} "
                         f"(B = {B})", fix="pass the model's B and num_classes (model.B, model.num_classes)")
    return classes


def split_output(pred: torch.Tensor, *, S: int, B: int, C: int | None = None) -> YoloOutput:
    """Split raw predictions [N, S, S, 5B + C] into their parts (see the module doc): the one
    decoding used by `yolo_loss`, `decode_boxes` and `postprocess`. Half precision becomes float32."""
    C = _check_pred(pred, S, B, C)
    pred = at_least_fp32(pred)
    boxes = pred[..., : BOX_VALUES * B].unflatten(-1, (B, BOX_VALUES))
    logits = pred[..., BOX_VALUES * B:]
    return YoloOutput(xy=boxes[..., 0:2], sqrt_wh=boxes[..., 2:4], conf=boxes[..., 4], class_logits=logits,
                      class_probs=logits.softmax(-1))


def cell_boxes(xy: torch.Tensor, wh: torch.Tensor, S: int) -> torch.Tensor:
    """XYXY boxes relative to the image (0..1) from cell offsets `xy` and image-relative sizes `wh`.

    `xy`, `wh` are [N, S, S, ..., 2] (x then y); the cell of [n, i, j] is row i, column j, so a
    centre is ((j + x) / S, (i + y) / S). Returns [N, S, S, ..., 4].
    """
    steps = torch.arange(S, device=xy.device, dtype=xy.dtype)
    shape = (1, S, S) + (1,) * (xy.dim() - 4)
    col = steps.view(1, 1, S).expand(1, S, S).reshape(shape)
    row = steps.view(1, S, 1).expand(1, S, S).reshape(shape)
    cx = (col + xy[..., 0]) / S
    cy = (row + xy[..., 1]) / S
    half_w, half_h = wh[..., 0] / 2, wh[..., 1] / 2
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of aligned pairs of XYXY boxes, a[..., 4] with b[..., 4] (broadcast): the diagonal of
    `torchvision.ops.box_iou` without its M x M matrix (the loss needs one IoU per predictor)."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


# --- targets ------------------------------------------------------------------------------------

def _plain(t) -> torch.Tensor:
    """A plain tensor from a tensor / tv_tensors.BoundingBoxes / list."""
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def encode_targets(boxes_list: Sequence[torch.Tensor], labels_list: Sequence[torch.Tensor], *, S: int, C: int,
                   img_size) -> torch.Tensor:
    """Ground truth as YOLO targets [N, S, S, 5 + C] (see the module doc for the layout).

    Args:
        boxes_list: per image, [K, 4] XYXY absolute pixels (clipped to the image; boxes of zero
            width or height after clipping are dropped).
        labels_list: per image, [K] class indices in [0, C).
        S: grid size; C: number of classes; img_size: int or (height, width) of the model input.

    Each box goes to the cell containing its centre; a cell keeps one box, the largest (equal areas:
    the first listed). One tensor pass over all boxes of the batch, no loop over boxes.
    """
    if len(boxes_list) != len(labels_list):
        raise ShapeError(f"{len(boxes_list)} box tensors but {len(labels_list)} label tensors",
                         fix="give one boxes and one labels tensor per image")
    height, width = _hw(img_size)
    n_images = len(boxes_list)
    boxes_t = [_plain(b) for b in boxes_list]
    labels_t = [_plain(lab) for lab in labels_list]
    device = boxes_t[0].device if boxes_t else torch.device("cpu")
    target = torch.zeros(n_images, S, S, TARGET_VALUES + C, device=device)
    if n_images == 0:
        return target
    for n, (b, lab) in enumerate(zip(boxes_t, labels_t)):
        if b.numel() and (b.dim() != 2 or b.shape[-1] != 4):
            raise ShapeError(f"image {n}: boxes must be [K, 4] XYXY, got shape {tuple(b.shape)}")
        if b.reshape(-1, 4).shape[0] != lab.reshape(-1).shape[0]:
            raise ShapeError(f"image {n}: {b.reshape(-1, 4).shape[0]} boxes but {lab.numel()} labels")
    counts = torch.tensor([b.reshape(-1, 4).shape[0] for b in boxes_t], device=device)
    boxes = torch.cat([b.reshape(-1, 4).to(device, torch.float32) for b in boxes_t])
    labels = torch.cat([lab.reshape(-1).to(device) for lab in labels_t]).long()
    image = torch.repeat_interleave(torch.arange(n_images, device=device), counts)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        bad = labels[(labels < 0) | (labels >= C)][0]
        raise DataError(f"class index {int(bad)} is outside [0, {C})",
                        fix="check the labels against the class names, or build the model with more classes")
    if not torch.isfinite(boxes).all():
        raise DataError("a box has a non-finite coordinate", fix="check the label files for NaN / inf values")

    x1, x2 = boxes[:, 0].clamp(0, width), boxes[:, 2].clamp(0, width)
    y1, y2 = boxes[:, 1].clamp(0, height), boxes[:, 3].clamp(0, height)
    w, h = (x2 - x1) / width, (y2 - y1) / height
    keep = (w > 0) & (h > 0)
    cx, cy = (x1 + x2) / (2 * width) * S, (y1 + y2) / (2 * height) * S  # in cells
    col, row = cx.floor().clamp(0, S - 1), cy.floor().clamp(0, S - 1)
    cell = (image * S + row.long()) * S + col.long()

    # One box per cell: the largest; among equal areas, the first listed.
    area = torch.where(keep, w * h, torch.full_like(w, -1.0))
    best_area = torch.full((n_images * S * S,), -1.0, device=device).scatter_reduce(0, cell, area, "amax")
    candidate = keep & (area == best_area[cell])
    order = torch.arange(boxes.shape[0], device=device)
    first = torch.full((n_images * S * S,), boxes.shape[0], device=device, dtype=torch.long)
    first = first.scatter_reduce(0, cell[candidate], order[candidate], "amin")
    winner = candidate & (first[cell] == order)

    values = torch.cat([torch.stack((cx - col, cy - row, w, h, torch.ones_like(w)), dim=1),
                        F.one_hot(labels, C).float()], dim=1)
    target.view(-1, TARGET_VALUES + C)[cell[winner]] = values[winner]
    return target


# --- loss ---------------------------------------------------------------------------------------

def yolo_loss(pred: torch.Tensor, target: torch.Tensor, *, S: int, B: int, C: int, lambda_coord: float = 5.0,
              lambda_noobj: float = 0.5, class_loss: str = "mse") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's sum-squared YOLO loss (module doc), computed in float32, divided by the batch size.

    Args:
        pred: raw model output [N, S, S, 5B + C] (any float dtype, e.g. under bf16 autocast).
        target: `encode_targets` output [N, S, S, 5 + C].
        lambda_coord, lambda_noobj: the paper's weights (5 and 0.5).
        class_loss: "mse" (the paper: squared error of the class probabilities) or "ce"
            (cross-entropy of the class scores).

    Returns (loss, parts): parts holds the detached terms "coord", "obj", "noobj", "cls" (each
    already weighted and divided by N; they sum to the loss).
    """
    if class_loss not in ("mse", "ce"):
        raise UsageError(f"class_loss must be 'mse' or 'ce', got {class_loss!r}")
    out = split_output(pred.float(), S=S, B=B, C=C)
    if target.shape != (pred.shape[0], S, S, TARGET_VALUES + C):
        raise ShapeError(f"YOLO targets must be [N, S, S, 5 + C] = {(pred.shape[0], S, S, TARGET_VALUES + C)}, "
                         f"got {tuple(target.shape)}", fix="encode them with encode_targets(..., S=S, C=C)")
    target = target.float()
    n = max(1, pred.shape[0])
    obj = target[..., 4] > 0.5  # [N, S, S]
    gt_xy = target[..., 0:2].unsqueeze(-2)  # [N, S, S, 1, 2]
    gt_sqrt_wh = target[..., 2:4].clamp(min=0).sqrt().unsqueeze(-2)

    with torch.no_grad():
        pred_box = out.boxes()  # [N, S, S, B, 4]
        gt_box = cell_boxes(gt_xy, target[..., 2:4].unsqueeze(-2), S)
        iou = paired_box_iou(pred_box, gt_box)  # [N, S, S, B]
        error = (out.xy - gt_xy).square().sum(-1) + (out.sqrt_wh - gt_sqrt_wh).square().sum(-1)
        overlap = iou.amax(-1, keepdim=True) > 0
        best = torch.where(overlap, iou, -error).argmax(-1)  # [N, S, S]
        responsible = F.one_hot(best, B).bool() & obj.unsqueeze(-1)  # 1obj_ij, [N, S, S, B]
    resp = responsible.float()

    coord_err = (out.xy - gt_xy).square().sum(-1) + (out.sqrt_wh - gt_sqrt_wh).square().sum(-1)
    coord = lambda_coord * (coord_err * resp).sum() / n
    obj_term = ((out.conf - iou).square() * resp).sum() / n
    noobj = lambda_noobj * (out.conf.square() * (1.0 - resp)).sum() / n
    if class_loss == "mse":
        cls = ((out.class_probs - target[..., TARGET_VALUES:]).square().sum(-1) * obj.float()).sum() / n
    else:
        labels = target[..., TARGET_VALUES:].argmax(-1)
        cls = F.cross_entropy(out.class_logits[obj], labels[obj], reduction="sum") / n
    loss = coord + obj_term + noobj + cls
    parts = {"coord": coord.detach(), "obj": obj_term.detach(), "noobj": noobj.detach(), "cls": cls.detach()}
    return loss, parts


# --- inference ----------------------------------------------------------------------------------

def decode_boxes(pred: torch.Tensor, S: int, B: int, img_size, *, C: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes, confidences and class probabilities of every predictor.

    Returns boxes [N, S*S*B, 4] (XYXY absolute pixels; the centre lies in the cell, the size is at
    most the image's, the box is not clipped to the image), confidences [N, S*S*B] in [0, 1] and
    class probabilities [N, S*S*B, C] (a cell's distribution repeated for its B boxes); predictor
    k = (i * S + j) * B + b is box b of the cell in row i, column j.
    """
    out = split_output(pred, S=S, B=B, C=C)
    height, width = _hw(img_size)
    rel = out.boxes()  # [N, S, S, B, 4]
    scale = rel.new_tensor([width, height, width, height])
    n = pred.shape[0]
    boxes = (rel * scale).reshape(n, S * S * B, 4)
    conf = out.confidence().reshape(n, S * S * B)
    probs = out.class_probs.unsqueeze(-2).expand(n, S, S, B, out.class_probs.shape[-1])
    return boxes, conf, probs.reshape(n, S * S * B, -1)


def postprocess(pred: torch.Tensor, *, S: int, B: int, C: int, img_size, conf_threshold: float = 0.01,
                iou_threshold: float = 0.5, max_det: int = 100) -> list[dict[str, torch.Tensor]]:
    """Detections per image: {"boxes": [K, 4] XYXY pixels (clipped to the image), "scores": [K],
    "labels": [K]}, sorted by score.

    score(box, c) = Pr(c | Object) * confidence (the paper's class-specific confidence); pairs with a
    score above `conf_threshold` go through per-class NMS at `iou_threshold`
    (`torchvision.ops.batched_nms`) and the best `max_det` are kept.
    """
    from torchvision.ops import batched_nms, clip_boxes_to_image

    height, width = _hw(img_size)
    boxes, conf, probs = decode_boxes(pred.detach(), S, B, img_size, C=C)
    boxes = clip_boxes_to_image(boxes, (int(round(height)), int(round(width))))
    scores = probs * conf.unsqueeze(-1)  # [N, M, C]
    results = []
    for n in range(pred.shape[0]):
        flat = scores[n].reshape(-1)
        index = torch.nonzero(flat > conf_threshold).squeeze(1)
        box_index, labels = index // C, index % C
        cand_boxes, cand_scores = boxes[n][box_index], flat[index]
        keep = batched_nms(cand_boxes, cand_scores, labels, iou_threshold)[:max_det]
        results.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": labels[keep]})
    return results
