"""Detection metrics against hand-computed values and an independent slow VOC07 reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cnnkit.errors import CnnkitError
from cnnkit.tasks.detection_metrics import (coco_metrics, plot_pr_curves, precision_recall_curves,
                                            voc07_ap50)


def P(boxes, scores, labels):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.as_tensor(scores, dtype=torch.float32),
            "labels": torch.as_tensor(labels, dtype=torch.int64)}


def G(boxes, labels, **extra):
    g = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.as_tensor(labels, dtype=torch.int64)}
    g.update({k: torch.tensor(v) for k, v in extra.items()})
    return g


# Two images, one class, three ground-truth boxes (A, B in image 1; C in image 2), four detections:
#   d1 0.9 image 1 [0,0,10,10]  = A                 IoU(A) = 1    -> TP
#   d2 0.8 image 1 [0,0,10,8]   duplicate of A      IoU(A) = 0.8  -> FP (A taken; IoU(B) = 0)
#   d3 0.7 image 2 [0,0,10,10]  = C                 IoU(C) = 1    -> TP
#   d4 0.6 image 2 [5,0,15,10]  half off C          IoU(C) = 1/3  -> FP
# B is never found.  n_pos = 3.
#   rank  TP  FP  precision  recall
#    1    1   0     1        1/3
#    2    1   1     1/2      1/3
#    3    2   1     2/3      2/3
#    4    2   2     1/2      2/3
# VOC07 11-point: r = 0, .1, .2, .3 -> max precision at recall >= r = 1      (4 points)
#                 r = .4, .5, .6    -> max precision at recall >= r = 2/3    (3 points)
#                 r = .7 ... 1.0    -> recall never reaches r        = 0      (4 points)
#   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11 = 0.54545...
# COCO 101-point at IoU .5: envelope (max to the right) = [1, 2/3, 2/3, 1/2];
#   r = 0.00 ... 0.33 (34 points) -> first rank with recall >= r is 1 -> 1
#   r = 0.34 ... 0.66 (33 points) -> rank 3 -> 2/3
#   r = 0.67 ... 1.00 (34 points) -> none -> 0
#   AP50 = (34 + 33 * 2/3) / 101 = 56/101 = 0.55446...
# Every TP has IoU 1 and every FP stays FP at higher thresholds, so AP@[.5:.95] = 56/101 too;
# AR100 = 2/3; all boxes are 10x10 (area 100 < 32^2) -> APs = AP, APm = APl = -1.
HAND_PREDS = [P([[0, 0, 10, 10], [0, 0, 10, 8]], [0.9, 0.8], [0, 0]),
              P([[0, 0, 10, 10], [5, 0, 15, 10]], [0.7, 0.6], [0, 0])]
HAND_GTS = [G([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), G([[0, 0, 10, 10]], [0])]
VOC_HAND = 6 / 11
COCO_AP50_HAND = 56 / 101


def test_hand_case_voc07():
    out = voc07_ap50(HAND_PREDS, HAND_GTS, ["obj"])
    assert out["mAP50_voc07"] == pytest.approx(VOC_HAND, abs=1e-12)
    assert out["per_class"] == {"obj": pytest.approx(VOC_HAND, abs=1e-12)}


def test_hand_case_coco():
    m = coco_metrics(HAND_PREDS, HAND_GTS, ["obj"], image_sizes=[(40, 40), (40, 40)])
    assert m["AP50"] == pytest.approx(COCO_AP50_HAND, abs=1e-9)
    assert m["AP"] == pytest.approx(COCO_AP50_HAND, abs=1e-9)
    assert m["AP75"] == pytest.approx(COCO_AP50_HAND, abs=1e-9)
    assert m["AR100"] == pytest.approx(2 / 3, abs=1e-9)
    assert m["APs"] == pytest.approx(COCO_AP50_HAND, abs=1e-9)
    assert m["APm"] == -1.0 and m["APl"] == -1.0
    assert m["per_class_AP50"] == {"obj": pytest.approx(COCO_AP50_HAND, abs=1e-9)}


def test_hand_case_pr_curve():
    rec, prec = precision_recall_curves(HAND_PREDS, HAND_GTS, ["obj"])["obj"]
    np.testing.assert_allclose(rec, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prec, [1, 1 / 2, 2 / 3, 1 / 2])


def test_perfect_predictions():
    gts = [G([[10, 10, 60, 50], [100, 20, 180, 200]], [0, 1]), G([[5, 5, 300, 250]], [2])]
    preds = [P(g["boxes"], [0.9] * len(g["labels"]), g["labels"]) for g in gts]
    m = coco_metrics(preds, gts, ["a", "b", "c"])
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert m[key] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in m["per_class_AP"].values())
    assert voc07_ap50(preds, gts, ["a", "b", "c"])["mAP50_voc07"] == pytest.approx(1.0)


def test_shifted_boxes_iou_between_half_and_three_quarters():
    # [20,0,120,100] vs [0,0,100,100]: intersection 8000, union 12000 -> IoU 2/3
    gts = [G([[0, 0, 100, 100]], [0])]
    preds = [P([[20, 0, 120, 100]], [0.8], [0])]
    m = coco_metrics(preds, gts, ["a"])
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.4)  # matched at IoU .50 .55 .60 .65, not at .70 ... .95
    assert voc07_ap50(preds, gts, ["a"])["mAP50_voc07"] == pytest.approx(1.0)


def test_wrong_class_scores_zero():
    gts = [G([[0, 0, 50, 50]], [0])]
    preds = [P([[0, 0, 50, 50]], [0.99], [1])]
    m = coco_metrics(preds, gts, ["cat", "dog"])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0
    assert m["per_class_AP50"] == {"cat": 0.0, "dog": -1.0}  # dog has no ground truth: undefined
    voc = voc07_ap50(preds, gts, ["cat", "dog"])
    assert voc == {"mAP50_voc07": 0.0, "per_class": {"cat": 0.0, "dog": -1.0}}


def test_multi_class_per_class_values():
    # a: found perfectly. b: two boxes, only one found -> precision [1], recall [1/2].
    #   VOC07 b = 6/11 (r = 0 ... .5); COCO AP50 b = 51/101 (r = 0.00 ... 0.50).  c: no ground truth.
    gts = [G([[0, 0, 40, 40], [50, 50, 90, 90]], [0, 1]), G([[10, 10, 70, 70]], [1])]
    preds = [P([[0, 0, 40, 40], [50, 50, 90, 90]], [0.9, 0.7], [0, 1]), P([], [], [])]
    names = ["a", "b", "c"]
    m = coco_metrics(preds, gts, names)
    assert m["per_class_AP50"]["a"] == pytest.approx(1.0)
    assert m["per_class_AP50"]["b"] == pytest.approx(51 / 101)
    assert m["per_class_AP"]["b"] == pytest.approx(51 / 101)
    assert m["per_class_AP"]["c"] == -1.0 and m["per_class_AP50"]["c"] == -1.0
    assert m["AP50"] == pytest.approx((1 + 51 / 101) / 2)
    voc = voc07_ap50(preds, gts, names)
    assert voc["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(6 / 11), "c": -1.0}
    assert voc["mAP50_voc07"] == pytest.approx((1 + 6 / 11) / 2)


def test_voc_duplicate_goes_to_most_overlapped_box_like_the_devkit():
    # g1 [0,0,10,10], g2 [0,2,10,12]. d1 = g1 takes g1. d2 [0,.5,10,10.5] overlaps g1 by .905 and
    # g2 by .739: the devkit assigns it to g1 (taken) -> FP; COCO falls back to g2 -> TP.
    gts = [G([[0, 0, 10, 10], [0, 2, 10, 12]], [0, 0])]
    preds = [P([[0, 0, 10, 10], [0, 0.5, 10, 10.5]], [0.9, 0.8], [0, 0])]
    assert voc07_ap50(preds, gts, ["a"])["mAP50_voc07"] == pytest.approx(6 / 11)
    assert coco_metrics(preds, gts, ["a"])["AP50"] == pytest.approx(1.0)


def test_voc_difficult_and_crowd_boxes_are_ignored():
    gts = [G([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], difficult=[False, True]),
           G([[0, 0, 10, 10], [40, 40, 80, 80]], [0, 0], iscrowd=[0, 1])]
    preds = [P([[20, 20, 30, 30], [0, 0, 10, 10]], [0.95, 0.5], [0, 0]),
             P([[40, 40, 80, 80], [0, 0, 10, 10]], [0.9, 0.4], [0, 0])]
    # the hits on ignored boxes vanish; the rest is two TPs out of two positives
    assert voc07_ap50(preds, gts, ["a"])["mAP50_voc07"] == pytest.approx(1.0)
    rec, prec = precision_recall_curves(preds, gts, ["a"])["a"]
    np.testing.assert_allclose(rec, [0.5, 1.0])
    assert coco_metrics(preds, gts, ["a"])["AP50"] == pytest.approx(1.0)  # crowd hit is not an FP


@pytest.mark.parametrize("preds,gts", [
    ([], []),                                                              # no images
    ([P([], [], [])], [G([], [])]),                                        # nothing anywhere
    ([P([[0, 0, 5, 5]], [0.5], [0])], [G([], [])]),                         # detections, no ground truth
    ([P([], [], [])], [G([[0, 0, 5, 5]], [0])]),                            # ground truth, no detections
    ([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
      P([[0, 0, 5, 5]], [0.5], [0])], [G([[1, 1, 6, 6]], [0]), G([], [])]),  # mixed empty images
])
def test_empty_cases_do_not_crash(preds, gts, tmp_path):
    m = coco_metrics(preds, gts, ["a"])
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert m[key] == 0.0
    voc = voc07_ap50(preds, gts, ["a"])
    assert voc["mAP50_voc07"] == 0.0
    curves = precision_recall_curves(preds, gts, ["a"])
    assert plot_pr_curves(curves, tmp_path / "pr.png").stat().st_size > 0


def test_inputs_are_checked():
    with pytest.raises(CnnkitError, match="predictions for"):
        coco_metrics([P([], [], [])], [], ["a"])
    with pytest.raises(CnnkitError, match="outside 0..0"):
        voc07_ap50([P([[0, 0, 1, 1]], [0.5], [3])], [G([], [])], ["a"])
    with pytest.raises(CnnkitError, match=r"shape \[N, 4\]"):
        coco_metrics([{"boxes": torch.zeros(2, 5), "scores": torch.zeros(2), "labels": torch.zeros(2)}],
                     [G([], [])], ["a"])


def test_pr_curve_png_is_written(tmp_path):
    gts = [G([[0, 0, 40, 40], [50, 50, 90, 90]], [0, 1]), G([[10, 10, 70, 70]], [1])]
    preds = [P([[0, 0, 40, 40], [50, 50, 90, 90], [0, 50, 30, 90]], [0.9, 0.7, 0.6], [0, 1, 1]),
             P([[12, 10, 70, 72]], [0.3], [1])]
    curves = precision_recall_curves(preds, gts, ["a", "b", "c"])
    assert len(curves["c"][0]) == 0
    out = plot_pr_curves(curves, tmp_path / "plots" / "pr_curve.png", title="val")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["pr_curve.png"]  # no temp file left


# ---------------------------------------------------------------------- independent slow reference
def _iou_py(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _voc07_reference(preds, gts, num_classes):
    """VOCevaldet.m, written out with plain loops (difficult boxes ignored)."""
    aps = {}
    for c in range(num_classes):
        gt_boxes, npos = {}, 0
        for i, g in enumerate(gts):
            rows = [(b, bool(d)) for b, l, d in zip(g["boxes"].tolist(), g["labels"].tolist(),
                                                   g["difficult"].tolist()) if l == c]
            gt_boxes[i] = {"boxes": [r[0] for r in rows], "diff": [r[1] for r in rows], "det": [False] * len(rows)}
            npos += sum(1 for r in rows if not r[1])
        dets = []
        for i, p in enumerate(preds):
            for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                if l == c:
                    dets.append((i, s, b))
        dets = sorted(dets, key=lambda d: -d[1])
        tp, fp = [], []
        for i, _, b in dets:
            ovmax, jmax = -1.0, -1
            for j, gb in enumerate(gt_boxes[i]["boxes"]):
                ov = _iou_py(b, gb)
                if ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax >= 0.5 and gt_boxes[i]["diff"][jmax]:
                continue
            hit = ovmax >= 0.5 and not gt_boxes[i]["det"][jmax]
            if hit:
                gt_boxes[i]["det"][jmax] = True
            tp.append(int(hit))
            fp.append(1 - int(hit))
        if npos == 0:
            continue
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp):
            ctp += t
            cfp += f
            rec.append(ctp / npos); prec.append(ctp / (ctp + cfp))
        ap = 0.0
        for k in range(11):
            t = k / 10
            ps = [p for r, p in zip(rec, prec) if r >= t - 1e-12]
            ap += (max(ps) if ps else 0.0) / 11
        aps[c] = ap
    return aps


def _random_scene(rng: random.Random, num_classes: int):
    gts, preds = [], []
    for _ in range(rng.randint(0, 8)):
        m = rng.randint(0, 6)
        boxes = []
        for _ in range(m):
            x, y = rng.randint(0, 60), rng.randint(0, 60)
            boxes.append([x, y, x + rng.randint(4, 30), y + rng.randint(4, 30)])
        labels = [rng.randrange(num_classes) for _ in range(m)]
        difficult = [rng.random() < 0.15 for _ in range(m)]
        dets, scores, dlabels = [], [], []
        for b, l in zip(boxes, labels):  # jittered copies (sometimes twice, sometimes relabelled)
            for _ in range(rng.choice([0, 1, 1, 2])):
                j = [v + rng.randint(-4, 4) for v in b]
                j[2], j[3] = max(j[2], j[0] + 1), max(j[3], j[1] + 1)
                dets.append(j)
                scores.append(round(rng.random(), 2))  # two decimals: score ties happen
                dlabels.append(l if rng.random() < 0.85 else rng.randrange(num_classes))
        for _ in range(rng.randint(0, 3)):  # background false positives
            x, y = rng.randint(0, 70), rng.randint(0, 70)
            dets.append([x, y, x + rng.randint(3, 20), y + rng.randint(3, 20)])
            scores.append(round(rng.random(), 2))
            dlabels.append(rng.randrange(num_classes))
        gts.append(G(boxes, labels, difficult=difficult))
        preds.append(P(dets, scores, dlabels))
    return preds, gts


def test_voc07_matches_slow_reference_on_random_data():
    rng = random.Random(7)
    names = ["a", "b", "c"]
    checked = 0
    for _ in range(60):
        preds, gts = _random_scene(rng, len(names))
        ref = _voc07_reference(preds, gts, len(names))
        out = voc07_ap50(preds, gts, names)
        for c, name in enumerate(names):
            if c in ref:
                assert out["per_class"][name] == pytest.approx(ref[c], abs=1e-12)
                checked += 1
            else:
                assert out["per_class"][name] == -1.0
        want = sum(ref.values()) / len(ref) if ref else 0.0
        assert out["mAP50_voc07"] == pytest.approx(want, abs=1e-12)
    assert checked > 100
