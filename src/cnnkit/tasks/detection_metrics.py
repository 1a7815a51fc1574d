"""Detection metrics: COCO mAP (through faster-coco-eval), PASCAL VOC 2007 11-point AP, PR curves.

Inputs everywhere are two lists with one entry per image, in the same order:
  prediction   {"boxes": [K, 4] XYXY absolute pixels, "scores": [K], "labels": [K] int, 0-based}
  ground truth {"boxes": [M, 4], "labels": [M]} and optionally "iscrowd" [M] (COCO crowd regions)
               or "difficult" [M] (VOC); tensors or anything `torch.as_tensor` takes.

COCO (Lin et al. 2014, cocodataset.org/#detection-eval): AP averaged over IoU 0.50:0.05:0.95 and
101 recall points, at most 100 detections per image and class; the protocol is faster-coco-eval's,
not ours. Category ids are the class indices + 1 (COCO's 1-based convention), image ids 1..N.

VOC 2007 (Everingham et al. 2010, IJCV 88(2), sec. 4.2 and the VOCdevkit's VOCevaldet.m): per class,
detections of all images sorted by score; each is assigned the same-class ground truth box of its
image it overlaps most; IoU >= 0.5 and that box not yet taken -> true positive, otherwise false
positive (a second detection of an object counts as false even when another, unmatched box also
overlaps it by 0.5: the devkit does not fall back). A detection assigned to a difficult (or crowd)
box counts as neither; such boxes are not in the recall denominator.
    AP = 1/11 * sum_{r in 0, 0.1, ..., 1} max_{r' >= r} precision(r')     (0 where recall never reaches r)
IoU is torchvision's continuous box IoU (no +1 pixel as in the MATLAB devkit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from cnnkit.errors import DataError, ShapeError

__all__ = ["coco_metrics", "voc07_ap50", "precision_recall_curves", "plot_pr_curves", "voc07_ap_from_curve"]

_AREA_NAMES = ("APs", "APm", "APl")


# ---------------------------------------------------------------------------------------------- input
def _boxes(x: Any, what: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(x if x is not None else []).detach().to("cpu", torch.float64)
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ShapeError(f"{what} {i}: boxes must have shape [N, 4] (XYXY pixels), got {tuple(t.shape)}")
    return t


def _vector(x: Any, n: int, what: str, i: int, key: str, dtype, default=None) -> torch.Tensor:
    if x is None:
        if default is None:
            raise DataError(f"{what} {i}: missing '{key}'", fix=f"give '{key}' with one entry per box")
        return torch.full((n,), default, dtype=dtype)
    t = torch.as_tensor(x).detach().to("cpu", dtype).reshape(-1)
    if t.numel() != n:
        raise ShapeError(f"{what} {i}: '{key}' has {t.numel()} entries for {n} boxes")
    return t


def _unpack(predictions: Sequence[dict], ground_truths: Sequence[dict], num_classes: int):
    """Per image: (pred boxes, scores, labels) and (gt boxes, labels, iscrowd, difficult), on CPU."""
    if len(predictions) != len(ground_truths):
        raise DataError(f"{len(predictions)} predictions for {len(ground_truths)} ground truths",
                        fix="give one prediction dict and one ground-truth dict per image, in the same order")
    preds, gts = [], []
    for i, (p, g) in enumerate(zip(predictions, ground_truths)):
        pb = _boxes(p.get("boxes"), "prediction", i)
        ps = _vector(p.get("scores"), len(pb), "prediction", i, "scores", torch.float64)
        pl = _vector(p.get("labels"), len(pb), "prediction", i, "labels", torch.int64)
        gb = _boxes(g.get("boxes"), "ground truth", i)
        gl = _vector(g.get("labels"), len(gb), "ground truth", i, "labels", torch.int64)
        crowd = _vector(g.get("iscrowd"), len(gb), "ground truth", i, "iscrowd", torch.bool, False)
        diff = _vector(g.get("difficult"), len(gb), "ground truth", i, "difficult", torch.bool, False)
        for what, lab in (("prediction", pl), ("ground truth", gl)):
            bad = lab[(lab < 0) | (lab >= num_classes)]
            if bad.numel():
                raise DataError(f"{what} {i}: label {int(bad[0])} outside 0..{num_classes - 1}",
                                fix=f"labels are 0-based indices into the {num_classes} class names")
        preds.append((pb, ps, pl))
        gts.append((gb, gl, crowd, diff))
    return preds, gts


# ----------------------------------------------------------------------------------------------- COCO
def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.tolist()


def _mean_valid(a: np.ndarray) -> float:
    """COCO's summary: mean over the entries that are defined (-1 marks 'no ground truth')."""
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else -1.0


def coco_metrics(predictions: Sequence[dict], ground_truths: Sequence[dict], names: Sequence[str],
                 image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """COCO bbox metrics, evaluated in memory by faster-coco-eval's `COCOeval_faster`.

    Returns {"AP" (AP@[.5:.95]), "AP50", "AP75", "APs", "APm", "APl", "AR100",
    "per_class_AP": {name: AP@[.5:.95]}, "per_class_AP50": {name: AP50}}.
    AP, AP50, AP75 and AR100 are 0.0 when there is no ground truth at all; APs/APm/APl and a
    class's entries are -1.0 (COCO's "undefined") when no ground-truth box falls in that area range
    or class. Detections of a class absent from the ground truth therefore cost nothing.
    `image_sizes`: optional (H, W) per image, written into the COCO "images" records. Ground-truth
    "iscrowd" is passed on (COCO crowd matching); "difficult" is a VOC notion and is not used here.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    names = list(names)
    if image_sizes is not None and len(image_sizes) != len(ground_truths):
        raise DataError(f"{len(image_sizes)} image sizes for {len(ground_truths)} images",
                        fix="give one (H, W) per image or none")
    preds, gts = _unpack(predictions, ground_truths, len(names))

    images, annotations, results = [], [], []
    for i, ((pb, ps, pl), (gb, gl, crowd, _)) in enumerate(zip(preds, gts)):
        image_id = i + 1
        record = {"id": image_id}
        if image_sizes is not None:
            record["height"], record["width"] = int(image_sizes[i][0]), int(image_sizes[i][1])
        images.append(record)
        areas = ((gb[:, 2] - gb[:, 0]) * (gb[:, 3] - gb[:, 1])).tolist()
        for box, label, area, is_crowd in zip(_xywh(gb), gl.tolist(), areas, crowd.tolist()):
            # annotation ids start at 1: faster-coco-eval uses id 0 as its "unmatched" marker
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": box, "area": area, "iscrowd": int(is_crowd)})
        for box, score, label in zip(_xywh(pb), ps.tolist(), pl.tolist()):
            results.append({"image_id": image_id, "category_id": label + 1, "bbox": box, "score": score})

    out: dict[str, Any] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": -1.0, "APm": -1.0, "APl": -1.0,
                           "AR100": 0.0, "per_class_AP": {n: -1.0 for n in names},
                           "per_class_AP50": {n: -1.0 for n in names}}
    if not annotations or not names:
        return out

    def quiet(*args, **kwargs):
        return None

    gt_api = COCO({"images": images, "annotations": annotations,
                   "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]},
                  print_function=quiet)
    dt_api = gt_api.loadRes(results)
    dt_api.print_function = quiet
    evaluator = COCOeval_faster(gt_api, dt_api, iouType="bbox", print_function=quiet)
    evaluator.params.catIds = list(range(1, len(names) + 1))  # every class, even those without boxes
    evaluator.evaluate()
    evaluator.accumulate()

    p = evaluator.params
    # precision: [T IoU thresholds, R recall points, K classes, A area ranges, M maxDets]
    precision = np.asarray(evaluator.eval["precision"])
    recall = np.asarray(evaluator.eval["recall"])  # [T, K, A, M]
    m = list(p.maxDets).index(100)
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    t75 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.75)))
    a_all = list(p.areaRngLbl).index("all")

    def headline(value: float) -> float:
        return value if value > -1 else 0.0

    out["AP"] = headline(_mean_valid(precision[:, :, :, a_all, m]))
    out["AP50"] = headline(_mean_valid(precision[t50, :, :, a_all, m]))
    out["AP75"] = headline(_mean_valid(precision[t75, :, :, a_all, m]))
    for key, label in zip(_AREA_NAMES, ("small", "medium", "large")):
        out[key] = _mean_valid(precision[:, :, :, list(p.areaRngLbl).index(label), m])
    out["AR100"] = headline(_mean_valid(recall[:, :, a_all, m]))
    for k, cat_id in enumerate(p.catIds):
        name = names[int(cat_id) - 1]
        out["per_class_AP"][name] = _mean_valid(precision[:, :, k, a_all, m])
        out["per_class_AP50"][name] = _mean_valid(precision[t50, :, k, a_all, m])
    return out


# ------------------------------------------------------------------------------------------- VOC 2007
def _match_voc(preds, gts, num_classes: int, iou_thr: float):
    """VOC devkit matching. Returns per class (tp [D] bool in score order, fp [D] bool, n_positives)."""
    det_score, det_label, det_iou, det_gt = [], [], [], []
    gt_label, gt_ignore = [], []
    offset = 0
    for (pb, ps, pl), (gb, gl, crowd, diff) in zip(preds, gts):
        if len(pb):
            if len(gb):
                iou = box_iou(pb, gb)
                iou[pl[:, None] != gl[None, :]] = -1.0  # only boxes of the detection's class count
                best_iou, best = iou.max(dim=1)
            else:
                best_iou = torch.full((len(pb),), -1.0, dtype=torch.float64)
                best = torch.full((len(pb),), -1 - offset, dtype=torch.int64)  # -1 after the offset
            det_score.append(ps)
            det_label.append(pl)
            det_iou.append(best_iou)
            det_gt.append(best + offset)
        gt_label.append(gl)
        gt_ignore.append(crowd | diff)
        offset += len(gb)

    def cat(parts, dtype):
        return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=dtype)

    scores, labels = cat(det_score, np.float64), cat(det_label, np.int64)
    ious, gt_index = cat(det_iou, np.float64), cat(det_gt, np.int64)
    g_label, g_ignore = cat(gt_label, np.int64), cat(gt_ignore, bool)

    per_class = []
    for c in range(num_classes):
        n_pos = int(np.count_nonzero((g_label == c) & ~g_ignore))
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        hit = ious[idx] >= iou_thr
        target = gt_index[idx]
        ignored = np.zeros(len(idx), bool)
        ignored[hit] = g_ignore[target[hit]]
        # the first detection (in score order) that hits a box takes it; later hits on it are duplicates
        first = np.zeros(len(idx), bool)
        counted = np.flatnonzero(hit & ~ignored)
        _, first_pos = np.unique(target[counted], return_index=True)
        first[counted[first_pos]] = True
        keep = ~ignored
        tp = first[keep]
        per_class.append((tp, ~tp, n_pos))
    return per_class


def _curve(tp: np.ndarray, fp: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    ctp, cfp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    recall = ctp / max(n_pos, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return recall, precision


def voc07_ap_from_curve(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP: mean over r in {0, 0.1, ..., 1} of max precision at recall >= r."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if recall.size == 0:
        return 0.0
    # envelope[i] = max(precision[i:]); recall is non-decreasing, so "recall >= r" is a suffix
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    thresholds = np.linspace(0.0, 1.0, 11)
    start = np.searchsorted(recall, thresholds - 1e-12, side="left")  # first index with recall >= r
    values = np.where(start < recall.size, envelope[np.minimum(start, recall.size - 1)], 0.0)
    return float(values.mean())


def voc07_and_curves(predictions: Sequence[dict], ground_truths: Sequence[dict], names: Sequence[str],
                     iou: float = 0.5) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`voc07_ap50` and `precision_recall_curves` from one matching pass (what an evaluation needs)."""
    names = list(names)
    preds, gts = _unpack(predictions, ground_truths, len(names))
    per_class: dict[str, float] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    aps = []
    for name, (tp, fp, n_pos) in zip(names, _match_voc(preds, gts, len(names), iou)):
        if n_pos == 0:
            per_class[name] = -1.0
            curves[name] = (np.zeros(0), np.zeros(0))
            continue
        curves[name] = _curve(tp, fp, n_pos)
        per_class[name] = voc07_ap_from_curve(*curves[name])
        aps.append(per_class[name])
    return {"mAP50_voc07": float(np.mean(aps)) if aps else 0.0, "per_class": per_class}, curves


def voc07_ap50(predictions: Sequence[dict], ground_truths: Sequence[dict], names: Sequence[str],
               iou: float = 0.5) -> dict[str, Any]:
    """PASCAL VOC 2007 11-point interpolated AP at IoU 0.5 (see the module docstring).

    Returns {"mAP50_voc07": mean over the classes that have ground truth (0.0 if none),
    "per_class": {name: AP, or -1.0 for a class without ground truth}}.
    """
    return voc07_and_curves(predictions, ground_truths, names, iou)[0]


def precision_recall_curves(predictions: Sequence[dict], ground_truths: Sequence[dict], names: Sequence[str],
                            iou: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, (recall, precision) after each detection in score order (VOC matching at `iou`).

    A class without ground truth gets two empty arrays.
    """
    return voc07_and_curves(predictions, ground_truths, names, iou)[1]


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path, title: str = "", *,
                   iou: float = 0.5) -> Path:
    """One PNG (atomic write): each class's precision-recall curve and the mean of the classes'
    interpolated curves; the legend gives each class's VOC07 11-point AP at `iou`."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, renders with Agg

    from cnnkit.engine.checkpoint import atomic_path

    tag = f"AP{round(iou * 100)}" if abs(iou * 100 - round(iou * 100)) < 1e-9 else f"AP@{iou:g}"
    grid = np.linspace(0.0, 1.0, 101)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    envelopes, aps = [], []
    shown = [(n, r, p) for n, (r, p) in curves.items() if len(r)]
    for name, rec, prec in shown:
        ap = voc07_ap_from_curve(rec, prec)
        aps.append(ap)
        env = np.maximum.accumulate(np.asarray(prec)[::-1])[::-1]
        start = np.searchsorted(rec, grid - 1e-12, side="left")
        envelopes.append(np.where(start < len(rec), env[np.minimum(start, len(rec) - 1)], 0.0))
        label = f"{name} {tag} {ap:.3f}" if len(shown) <= 25 else None
        ax.plot(np.concatenate([[0.0], rec]), np.concatenate([[prec[0]], prec]), linewidth=1, label=label)
    if envelopes:
        ax.plot(grid, np.mean(envelopes, axis=0), color="black", linewidth=2.5,
                label=f"all classes m{tag} {np.mean(aps):.3f}")
        ax.legend(loc="lower left", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=title or f"precision-recall (IoU {iou:g}, VOC07 11-point AP)")
    ax.grid(alpha=0.3)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    return path
