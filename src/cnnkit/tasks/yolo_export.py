"""YOLO with its post-processing inside the exported graph (`cnnkit export --with-nms`).

`YoloWithNMS` runs a YOLO model, then `cnnkit.tasks.yolo`'s decoding, class-specific confidence,
threshold, per-class NMS and the best `max_det`, as one graph with fixed-size outputs:

    detections [N, max_det, 6] float32: x1, y1, x2, y2 (pixels of the img_size x img_size input),
               score, class index; sorted by score, rows after `count` are zeros
    count      [N] int64: how many rows of each image are detections
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.errors import UsageError


class _OnnxNMS(torch.autograd.Function):
    """ONNX NonMaxSuppression, which is per image and per class by itself: boxes [N, M, 4], scores
    [N, C, M] -> selected [K, 3] = (image, class, box). Only used while exporting to ONNX; its forward
    (what the tracer runs to get shapes) is the eager selection."""

    @staticmethod
    def forward(ctx, boxes, scores, iou_threshold: float, conf_threshold: float, max_per_class: int):
        return select_nms(boxes, scores, iou_threshold, conf_threshold)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, conf_threshold: float, max_per_class: int):
        # Corners in either order are fine: IoU does not change when x and y swap roles.
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                    g.op("Constant", value_t=torch.tensor([conf_threshold], dtype=torch.float)))


def select_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, conf_threshold: float) -> torch.Tensor:
    """Per image and class: pairs scoring above `conf_threshold`, greedy NMS at `iou_threshold`
    (torchvision `batched_nms`, one group per image and class). boxes [N, M, 4], scores [N, C, M] ->
    [K, 3] (image, class, box), sorted by score. No Python loop over images: a traced graph keeps a
    dynamic batch."""
    from torchvision.ops import batched_nms

    idx = torch.nonzero(scores > conf_threshold)
    img, cls, box = idx[:, 0], idx[:, 1], idx[:, 2]
    keep = batched_nms(boxes[img, box], scores[img, cls, box], img * scores.shape[1] + cls, iou_threshold)
    return idx[keep]


class YoloWithNMS(nn.Module):
    """A YOLO model followed by `cnnkit.tasks.yolo.postprocess` as one graph with fixed-size outputs:
    images [N, 3, H, W] -> (detections [N, max_det, 6], count [N]); see the module doc."""

    def __init__(self, model: nn.Module, *, img_size: int, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.5, max_det: int = 100):
        super().__init__()
        if not 0.0 <= conf_threshold < 1.0:
            raise UsageError(f"--conf-threshold must be in [0, 1), got {conf_threshold}")
        if not 0.0 < iou_threshold <= 1.0:
            raise UsageError(f"--iou-threshold must be in (0, 1], got {iou_threshold}")
        if max_det < 1:
            raise UsageError(f"--max-det must be at least 1, got {max_det}")
        self.model = model
        self.S, self.B, self.C = int(model.S), int(model.B), int(model.num_classes)
        self.img_size = int(img_size)
        self.conf_threshold, self.iou_threshold, self.max_det = float(conf_threshold), float(iou_threshold), int(max_det)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.ops import clip_boxes_to_image

        from cnnkit.tasks.yolo import decode_boxes

        boxes, conf, probs = decode_boxes(self.model(x).float(), self.S, self.B, self.img_size, C=self.C)
        boxes = clip_boxes_to_image(boxes, (self.img_size, self.img_size))
        scores = (probs * conf.unsqueeze(-1)).transpose(1, 2).contiguous()  # [N, C, M]
        n, c, m = scores.shape
        if torch.onnx.is_in_onnx_export():
            sel = _OnnxNMS.apply(boxes, scores, self.iou_threshold, self.conf_threshold, self.max_det)
        else:
            sel = select_nms(boxes, scores, self.iou_threshold, self.conf_threshold)
        flat = scores.reshape(n, c * m)
        picked = torch.zeros_like(flat).reshape(-1).scatter(
            0, (sel[:, 0] * c + sel[:, 1]) * m + sel[:, 2], torch.ones_like(sel[:, 0], dtype=flat.dtype)).reshape(n, c * m)
        k = min(self.max_det, c * m)
        # Scores are >= 0, so every kept pair ranks before every other (-1).
        top, index = torch.where(picked > 0, flat, torch.full_like(flat, -1.0)).topk(k, dim=1)
        valid = top >= 0
        cls, box = index // m, index % m
        chosen = torch.gather(boxes, 1, box.unsqueeze(-1).expand(n, k, 4))
        det = torch.cat([chosen, top.unsqueeze(-1), cls.unsqueeze(-1).to(chosen.dtype)], dim=-1)
        det = det * valid.unsqueeze(-1).to(det.dtype)
        if k < self.max_det:
            det = nn.functional.pad(det, (0, 0, 0, self.max_det - k))
        return det, valid.sum(1)


def unpad_detections(det: torch.Tensor, count: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """`YoloWithNMS` outputs -> one dict per image as `postprocess` returns them."""
    out = []
    for d, n in zip(det, count.tolist()):
        d = d[: int(n)]
        out.append({"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].round().long()})
    return out
