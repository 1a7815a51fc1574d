"""Object detection with YOLO (Redmon et al. 2016): data and augmentation, the loss, evaluation
(COCO AP through faster-coco-eval, VOC2007 11-point AP50), prediction and drawing.

The augmentation is the paper's: random scaling and translation of up to 20% of the image size,
random exposure and saturation of up to 1.5x, plus horizontal flips; boxes move with the pixels and
are clamped and sanitised after them. The loader only brings each image to the input size; the
augmentation runs on the whole batch where it lands, CPU or GPU (`BoxAugment`). Evaluation runs in the network's
input frame (images resized to img_size x img_size); predictions are mapped back to each image's
own pixels only when predicting files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.errors import UsageError
from cnnkit.taskapi import (PROBABILITY, EvalState, PredictionWriter, ResultWriter, Task, TaskData, TaskOptions,
                            option, register_task)

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


class BoxAugment:
    """YOLO's training augmentation (Redmon et al. 2016, section 2.2), done on the whole batch where it
    lands (CPU or GPU) instead of image by image in the loader (1.5 ms an image on two AVX2 cores, 11% of
    a detector step at 160 px). Per image: a scale s in [1 - scale, 1 + scale] about the image centre and
    a whole-pixel translation of up to `translate` of the image size (nearest-pixel sampling, black
    outside: torchvision's RandomAffine with these settings), a horizontal flip with probability 0.5,
    then exposure and saturation factors in [1 / colour, colour] (brightness first, then saturation,
    each clipped to the pixel range; torchvision's ColorJitter applies the two in random order, which
    differs only where a pixel clips). Boxes (XYXY pixels of the input frame) move with the pixels, are
    clipped to the image and dropped when narrower or lower than `min_size` pixels. Random numbers come
    from torch's CPU generator, so a resumed run draws what the interrupted one would have."""

    def __init__(self, scale: float = 0.2, translate: float = 0.2, colour: float = 1.5, min_size: float = 2.0):
        self.scale, self.translate, self.colour, self.min_size = scale, translate, colour, min_size

    def draw(self, n: int, h: int, w: int) -> dict[str, torch.Tensor]:
        """Each image's parameters, [n] each: s, tx and ty (whole pixels), flip, brightness, saturation."""
        s = torch.empty(n).uniform_(1 - self.scale, 1 + self.scale)
        tx = torch.empty(n).uniform_(-self.translate * w, self.translate * w).round()
        ty = torch.empty(n).uniform_(-self.translate * h, self.translate * h).round()
        flip = torch.rand(n) < 0.5
        lo, hi = 1 / self.colour, self.colour
        return {"s": s, "tx": tx, "ty": ty, "flip": flip, "brightness": torch.empty(n).uniform_(lo, hi),
                "saturation": torch.empty(n).uniform_(lo, hi)}

    def __call__(self, x: torch.Tensor, targets: list[dict], mean, std, params: dict | None = None):
        """Normalised float images [N, C, H, W] ((pixel / 255 - mean) / std) and their targets -> the same,
        augmented (new tensors and dicts; the inputs are left as they were)."""
        n, c, h, w = x.shape
        p = params if params is not None else self.draw(n, h, w)
        unit = all(m == 0.0 for m in mean) and all(sd == 1.0 for sd in std)
        m = torch.tensor(mean, dtype=torch.float32, device=x.device)
        sd = torch.tensor(std, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            pixels, outside = self.move_pixels(x.float(), p)  # [N, H*W, C], [N, H*W, 1]
            if not unit:
                pixels.mul_(sd).add_(m)  # pixel / 255
            self.jitter(pixels.masked_fill_(outside, 0.0), p)
            if not unit:
                pixels.sub_(m).div_(sd)
        out = pixels.to(x.dtype).view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last strides
        if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            out = out.contiguous()
        return out, self.move_boxes(targets, p, h, w)

    @staticmethod
    def source_index(size: int, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, size] index of the source pixel each output pixel takes (nearest) and whether it is inside:
        output pixel centre u = j + 0.5 shows the source point (u - size / 2 - t) / s + size / 2."""
        u = torch.arange(size, dtype=torch.float32) + 0.5
        src = ((u.view(1, -1) - size / 2 - t.view(-1, 1)) / s.view(-1, 1) + size / 2).floor()
        inside = (src >= 0) & (src < size)
        return src.clamp(0, size - 1).long(), inside

    def move_pixels(self, x: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled, translated and flipped images as [N, H*W, C] (each pixel's channels together: one row
        gather from the batch viewed as N*H*W pixels) and [N, H*W, 1] where the source is outside."""
        n, c, h, w = x.shape
        rows, rows_in = self.source_index(h, p["s"], p["ty"])
        cols, cols_in = self.source_index(w, p["s"], p["tx"])
        flip = p["flip"].view(n, 1)
        cols, cols_in = torch.where(flip, cols.flip(1), cols), torch.where(flip, cols_in.flip(1), cols_in)
        index = (torch.arange(n).view(n, 1, 1) * (h * w) + rows.view(n, h, 1) * w + cols.view(n, 1, w)).view(-1)
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels_last
        moved = pixels.index_select(0, index.to(x.device)).view(n, h * w, c)
        outside = ~(rows_in.view(n, h, 1) & cols_in.view(n, 1, w)).view(n, h * w, 1)
        return moved, outside.to(x.device)

    @staticmethod
    def jitter(y: torch.Tensor, p: dict) -> torch.Tensor:
        """Exposure, then saturation, of [N, H*W, C] pixels in [0, 1] (changed in place)."""
        n, _, c = y.shape
        y.mul_(p["brightness"].to(y.device).view(n, 1, 1)).clamp_(0, 1)
        if c == 3:
            k = p["saturation"].to(y.device).view(n, 1, 1)
            grey = y @ torch.tensor([[0.2989], [0.587], [0.114]], dtype=y.dtype, device=y.device)  # ITU-R 601
            y.mul_(k).add_(grey.mul_(1 - k)).clamp_(0, 1)
        return y

    def move_boxes(self, targets: list[dict], p: dict, h: int, w: int) -> list[dict]:
        """Every image's boxes moved as its pixels were (all images' boxes in one tensor), clipped to the
        image, those under `min_size` dropped; new dicts, the other keys kept."""
        counts = [len(t["boxes"]) for t in targets]
        if not sum(counts):
            return [dict(t) for t in targets]
        boxes = torch.cat([t["boxes"] for t in targets])
        dev, dt = boxes.device, boxes.dtype
        per_box = {k: p[k].to(dev).repeat_interleave(torch.tensor(counts, device=dev)) for k in ("s", "tx", "ty", "flip")}
        s = per_box["s"].to(dt).view(-1, 1)
        centre = torch.tensor([w / 2, h / 2] * 2, dtype=dt, device=dev)
        shift = torch.stack([per_box["tx"], per_box["ty"]] * 2, dim=1).to(dt)
        b = (boxes - centre) * s + centre + shift
        flipped = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        b = torch.where(per_box["flip"].view(-1, 1), flipped, b)
        b = torch.minimum(b.clamp(min=0), torch.tensor([w, h, w, h], dtype=dt, device=dev))
        keep = ((b[:, 2] - b[:, 0]) >= self.min_size) & ((b[:, 3] - b[:, 1]) >= self.min_size)
        out = []
        for t, bi, ki in zip(targets, b.split(counts), keep.split(counts)):
            out.append({**t, "boxes": bi[ki], "labels": t["labels"][ki]})
        return out


def eval_transform(img_size: int):
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True), v2.ClampBoundingBoxes(),
                       v2.SanitizeBoundingBoxes(min_size=1.0)])


@dataclass
class DetectOptions(TaskOptions):
    on_bad_label: str = option("error", "what a malformed label line or box does (skip: the box is left out and "
                               "counted)", choices=("error", "skip"))
    stride: int | None = option(None, "yolo: stride of the backbone map the head reads, which sets the grid "
                                "(S = img-size / stride; default: the task's)", type=int, choices=(8, 16, 32),
                                model=True)


@register_task
class DetectTask(Task):
    name = "detect"
    fitness = "AP50"
    metric_names = ("loss", "AP", "AP50", "AP75", "mAP50_voc07")
    Options = DetectOptions
    # YOLO's S x S x (5B+C) head on the offline ImageNet EfficientNet-Lite0, AdamW with gradient clipping:
    # measured on the 4,000 built-in scenes (BENCHMARKS.md); the paper's SGD recipe (momentum 0.9, wd 5e-4)
    # reached at best AP50 0.42 against AdamW's 0.68 in the same 16 epochs of the 2,000-scene set; the layers at
    # stride <= 4 stay frozen (ImageNet's edges; 1.4-1.5x faster steps, AP50 unchanged at equal epochs); the
    # input stays x / 255 ("unit"): the weights' own (x - 0.5) / 0.5 gave AP50 0.704 against 0.728 / 0.732;
    # the head reads the stride-16 map (a 10 x 10 grid at 160 px; the stride-32 blocks are not built): at 6
    # epochs AP50 0.723 against 0.637 with stride 32, on a denser scene set 0.651 against 0.227 in 5 minutes,
    # and 1.3-1.5x the images a second (BENCHMARKS.md, "Session 11")
    defaults = dict(model="yolo", model_kwargs={"backbone": "efficientnet_lite0", "width": 0.5, "stride": 16},
                    config={"data": "scenes", "img_size": 160, "batch_size": 32, "epochs": 12, "lr": 0.002,
                            "optimizer": "adamw", "weight_decay": 0.05, "clip_grad": 10.0, "warmup_epochs": 0.5,
                            "ema": True, "ema_decay": 0.995, "weights": "imagenet", "freeze_early": 4,
                            "input_norm": "unit"})
    figure = ("pr_curve.png", "precision-recall curves")
    score_meaning = "F1 of the detections with score >= 0.25 matched at IoU 0.5"
    predict_flags = {
        "--conf-threshold": dict(type=PROBABILITY, default=0.25, help="detect: lowest class-specific confidence "
                                 "kept (0.001 keeps what val scores, for mAP with other tools)"),
        "--data": dict(default=None, help="detect: the dataset the images come from (as `train --data` takes it); "
                       "predictions.json then holds its COCO image and category ids, each image found by path or "
                       "file name (default: none; image_id = 1..N in file order, category_id the checkpoint's)")}
    demo_minutes = 9.0  # of `fit` in `make demo`: with classify 5.0 and ~0.6 min of predict + report, under 25 min
    demo_quick_steps = 2
    saves = {"json": "predictions.json: the validation detections val scores (confidence >= 0.001, at most 100 "
                     "an image) in COCO results format, with the dataset's image and category ids"}

    def __init__(self):
        self.conf_threshold = 0.001  # evaluation keeps low-score boxes: AP integrates over all of them
        self.iou_threshold = 0.5
        self.max_det = 100
        self.geometry: dict[str, int] = {}
        self.batch_augment: BoxAugment | None = None

    # -- data ---------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        from cnnkit.data.detection import detection_collate, load_detection_data

        d = load_detection_data(cfg.data, on_bad_label=cfg.options.on_bad_label)
        d.train.transform = eval_transform(cfg.img_size)  # the random part runs on the batch: BoxAugment
        self.batch_augment = BoxAugment() if cfg.augment else None
        d.val.transform = eval_transform(cfg.img_size)
        meta = {"img_size": cfg.img_size, "channels": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                # the dataset's COCO id of each class, for results files (`cnnkit.data.formats.coco_ids`)
                "category_ids": d.coco_ids().category_ids}
        skipped = [(f"{p}:{line}" if line else str(p), why) for p, line, why in getattr(d, "problems", [])]
        return TaskData(d.train, d.val, list(d.names), collate_fn=detection_collate,
                        in_memory=bool(getattr(d, "in_memory", True)), source=d.source, meta=meta, skipped=skipped)

    def configure(self, meta: dict[str, Any]) -> None:
        self.configure_normalisation(meta)
        self.geometry = {k: int(meta[k]) for k in ("S", "B", "img_size") if k in meta}

    def move_targets(self, targets, device):
        return [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device).float(), "labels": t["labels"].to(device)}
                for t in targets]

    # -- model and loss -------------------------------------------------------------------------
    def build_model(self, cfg, data: TaskData):
        from cnnkit.models import build_model

        kwargs = dict(num_classes=len(data.names), img_size=cfg.img_size, **cfg.model_kwargs)
        if cfg.weights:
            kwargs.update(weights=cfg.weights, download=cfg.download)
        model = build_model(cfg.model, **kwargs)
        data.meta.update(S=int(model.S), B=int(model.B), img_size=int(model.img_size))
        self.configure(data.meta)
        self.adopt_weights_normalisation(model, cfg, data)
        return model

    def _shape(self, model) -> dict[str, int]:
        return {"S": int(model.S), "B": int(model.B), "C": int(model.num_classes), "img_size": int(model.img_size)}

    def loss(self, model, images, targets):
        from cnnkit.tasks.yolo import encode_targets, yolo_loss

        g = self._shape(model)
        if self.batch_augment is not None and model.training:
            images, targets = self.batch_augment(images, targets, self.mean, self.std)
        pred = model(images)
        target = encode_targets([t["boxes"] for t in targets], [t["labels"] for t in targets],
                                S=g["S"], C=g["C"], img_size=g["img_size"])
        loss, parts = yolo_loss(pred.float(), target, S=g["S"], B=g["B"], C=g["C"])
        return loss, {k: float(v) for k, v in parts.items()}

    def _geometry(self, raw: torch.Tensor) -> dict[str, int]:
        """S, B, C and img_size of raw outputs [N, S, S, 5B + C] (B and img_size as the checkpoint recorded)."""
        B = int(self.geometry.get("B", 2))
        return {"S": int(raw.shape[1]), "B": B, "C": int(raw.shape[-1]) - 5 * B,
                "img_size": int(self.geometry.get("img_size", 0))}

    def decode(self, raw: torch.Tensor, conf_threshold: float | None = None) -> list[dict]:
        """Raw outputs -> one dict of boxes (model frame), scores and labels per image, after NMS."""
        from cnnkit.tasks.yolo import postprocess

        g = self._geometry(raw)
        return postprocess(raw.float(), S=g["S"], B=g["B"], C=g["C"], img_size=g["img_size"],
                           conf_threshold=self.conf_threshold if conf_threshold is None else conf_threshold,
                           iou_threshold=self.iou_threshold, max_det=self.max_det)

    def detect(self, model, images: torch.Tensor, *, conf_threshold: float | None = None) -> list[dict]:
        """Batched inference: float images [N,3,H,W] in the model frame -> one dict per image."""
        self.geometry.setdefault("img_size", int(model.img_size))
        return self.decode(model(images).float(), conf_threshold)

    # -- evaluation -----------------------------------------------------------------------------
    def eval_start(self, names, device) -> EvalState:
        return EvalState(sums={"loss": 0.0, "n": 0}, lists={"preds": [], "gts": [], "examples": []})

    def eval_step(self, state: EvalState, raw, images, targets) -> list:
        from cnnkit.tasks.yolo import encode_targets, yolo_loss

        g = self._geometry(raw)
        enc = encode_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], S=g["S"], C=g["C"],
                             img_size=g["img_size"])
        state.add(loss=float(yolo_loss(raw, enc, S=g["S"], B=g["B"], C=g["C"])[0]) * raw.shape[0], n=raw.shape[0])
        preds = [{k: v.cpu() for k, v in p.items()} for p in self.decode(raw)]
        state.extend("preds", preds)
        state.extend("gts", [{k: v.cpu() for k, v in t.items()} for t in targets])
        state.extend("examples", [img.cpu() for img in images], limit=16)
        return preds

    def summarise(self, state: EvalState, names) -> dict[str, Any]:
        from cnnkit.tasks.detection_metrics import coco_metrics, voc07_and_curves

        preds, gts, examples = state.lists["preds"], state.lists["gts"], state.lists["examples"][:16]
        loss_sum, n = state.sums["loss"], state.sums["n"]
        coco = coco_metrics(preds, gts, names)
        voc, curves = voc07_and_curves(preds, gts, names)
        return {"loss": loss_sum / max(1, n), "AP": float(coco["AP"]), "AP50": float(coco["AP50"]),
                "AP75": float(coco["AP75"]), "mAP50_voc07": float(voc["mAP50_voc07"]), "images": n,
                "per_class_AP50": coco.get("per_class_AP50", {}), "per_class_AP": coco.get("per_class_AP", {}),
                "pr_curves": curves,
                "examples": (examples, preds[:len(examples)], gts[:len(examples)])}

    def draw(self, metrics: dict[str, Any], out_dir: Path, *, names: list[str]) -> Path:
        from cnnkit.tasks.detection_metrics import plot_pr_curves
        from cnnkit.plots import plot_grid

        out_dir = Path(out_dir)
        plot_pr_curves(metrics["pr_curves"], out_dir / "pr_curve.png",
                       title=f"AP50 {metrics['AP50']:.3f}  AP {metrics['AP']:.3f}  VOC07 AP50 {metrics['mAP50_voc07']:.3f}")
        images, preds, _ = metrics["examples"]
        pics = [draw_detections(img, p, names, min_score=0.25).permute(1, 2, 0).numpy() for img, p in zip(images, preds)]
        if pics:
            plot_grid(pics, [f"{int((p['scores'] >= 0.25).sum())} boxes" for p in preds], out_dir / "val_predictions.png",
                      cols=4)
        return out_dir / "pr_curve.png"

    # -- per-image scores (the run report's gallery) ----------------------------------------------
    def score_batch(self, raw, targets, conf_threshold: float = 0.25) -> list[tuple[float, Any]]:
        """Per image (score, prediction). The score is the F1 of the detections kept at `conf_threshold`
        (predict's default), matched to the truth at IoU 0.5 as VOC matches them: 2 TP / (2 TP + FP + FN);
        1.0 for an image with neither objects nor detections."""
        from cnnkit.tasks.detection_metrics import _match_voc, _unpack

        dets = self.decode(raw, conf_threshold)
        n_cls = self._geometry(raw)["C"]
        out = []
        for det, truth in zip(dets, self.move_targets(targets, torch.device("cpu"))):
            det = {k: v.detach().cpu() for k, v in det.items()}
            per_class = _match_voc(*_unpack([det], [truth], n_cls), n_cls, 0.5)
            tp = sum(int(c[0].sum()) for c in per_class)
            fp = sum(int(c[1].sum()) for c in per_class)
            n_pos = sum(c[2] for c in per_class)
            f1 = 2 * tp / (tp + fp + n_pos) if tp + fp + n_pos else 1.0
            out.append((f1, {"det": det, "tp": tp, "fp": fp, "n_pos": n_pos}))
        return out

    def draw_example(self, image, target, prediction, score: float, names: list[str]) -> list[tuple[Any, str]]:
        """The true boxes and the detections of one image: [(HxWx3 uint8, caption)] x 2."""
        boxes = target["boxes"].as_subclass(torch.Tensor)
        truth = {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": target["labels"]}
        p = prediction
        return [(draw_detections(image, truth, names, min_score=0.0).permute(1, 2, 0).numpy(),
                 f"truth: {p['n_pos']} object(s)"),
                (draw_detections(image, p["det"], names, min_score=0.0).permute(1, 2, 0).numpy(),
                 f"F1 {score:.2f}: {p['tp']} found,\n{p['n_pos'] - p['tp']} missed, {p['fp']} false")]

    # -- results files --------------------------------------------------------------------------
    def result_writer(self, kinds, data: TaskData, out_dir) -> ResultWriter:
        if tuple(kinds) != ("json",):
            return super().result_writer(kinds, data, out_dir)
        return CocoResultsWriter(data, Path(out_dir) / "predictions.json")

    # -- prediction -----------------------------------------------------------------------------
    def predict_step(self, trained, raw, options) -> list:
        return self.decode(raw, options.get("conf_threshold", 0.25))

    def prediction_writer(self, trained, paths, out_dir, options, log) -> PredictionWriter:
        """Per image a drawn PNG (images/) and a YOLO txt (labels/, `class cx cy w h score`, normalised;
        classes.txt names the classes), plus predictions.json in COCO results format
        (`cnnkit.tasks.detection_results`); see `DetectionWriter` for its ids."""
        return DetectionWriter(trained, paths, Path(out_dir), options.get("data"), log)

    # -- data check, export, demo ----------------------------------------------------------------
    def check_data(self, spec, *, decode: bool = True):
        from cnnkit.data.check import check_detection

        return check_detection(spec, self.name, decode=decode)

    def export_module(self, model, meta, nms):
        size = int(meta["preprocess"]["img_size"])
        meta["geometry"] = {"S": int(model.S), "B": int(model.B), "C": int(model.num_classes), "img_size": size}
        if nms is None:
            return model
        from cnnkit.tasks.yolo_export import YoloWithNMS

        module = YoloWithNMS(model, img_size=size, **nms)
        meta["nms"] = {"conf_threshold": module.conf_threshold, "iou_threshold": module.iou_threshold,
                       "max_det": module.max_det}
        return module

    def export_outputs(self, with_nms: bool) -> list[str]:
        if with_nms:
            return ["detections [N, max_det, 6]: x1, y1, x2, y2, score, class", "count [N]"]
        return ["predictions [N, S, S, 5B + C] (decode with cnnkit.tasks.yolo.postprocess)"]

    def for_exported(self, metadata):
        return InGraphNMSDetect() if metadata.get("with_nms") else self

    def demo_predict(self, trained, run_dir, cfg) -> None:
        scenes_demo_predict(trained, run_dir)

    def demo_lines(self, cfg, metrics, run_dir, epochs: int, minutes: float) -> list[str]:
        return [scenes_demo_headline(cfg, epochs, minutes),
                f"      held-out 300 scenes: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f}, "
                f"VOC07 AP50 {metrics['mAP50_voc07']:.3f}",
                f"      {run_dir}/pr_curve.png, val_predictions.png, predict/images/"]


def scenes_demo_predict(trained, run_dir) -> None:
    """`make demo`: predict the first 8 validation scenes into run_dir/predict."""
    from cnnkit.data.scenes import ensure_scenes
    from cnnkit.engine.predictor import predict_files

    val_images = sorted((ensure_scenes() / "images" / "val").iterdir())[:8]
    predict_files(trained, val_images, out_dir=Path(run_dir) / "predict")


def scenes_demo_headline(cfg, epochs: int, minutes: float) -> str:
    backbone = cfg.model_kwargs.get("backbone", "")
    budget = f" (budget {cfg.time:g} min)" if cfg.time else ""
    return (f"demo: {cfg.model} on {backbone} ({cfg.weights or 'scratch'}) trained {epochs} epoch{'s' * (epochs != 1)} "
            f"on the built-in {cfg.data} in {minutes:.1f} min{budget}")


class InGraphNMSDetect(DetectTask):
    """Reads a graph exported with --with-nms (`cnnkit.tasks.yolo_export`): its outputs are already
    decoded and suppressed, so prediction only unpads them."""

    def predict_step(self, trained, outputs, options) -> list:
        from cnnkit.tasks.yolo_export import unpad_detections

        model = trained.model
        baked = float(model.metadata["nms"]["conf_threshold"])
        conf = float(options.get("conf_threshold", 0.25))
        if conf < baked:
            raise UsageError(f"{model.path} was exported with NMS at --conf-threshold {baked:g}; it cannot "
                             f"return the boxes between {conf:g} and {baked:g}",
                             fix=f"use --conf-threshold {baked:g} or more, or export again without --with-nms")
        det, count = outputs
        # NMS then a higher threshold keeps the same boxes as that threshold then NMS: a box below it
        # never suppresses one above it.
        return [{k: v[d["scores"] > conf] for k, v in d.items()} for d in unpad_detections(det, count)]


class DetectionWriter(PredictionWriter):
    """`cnnkit predict` of a detector: images/<stem>.png drawn, labels/<stem>.txt, classes.txt, predictions.json.

    Its ids: with `data` (the dataset, as `--data` takes it) each image's id in that dataset's COCO
    file (found by path, else by file name; an image not in it is a DataError) and its category
    ids; without, image ids 1..N in file order and the category ids the checkpoint recorded
    (label + 1 for a checkpoint that has none). `log` gets one line saying which."""

    def __init__(self, trained, paths, out_dir: Path, data, log):
        from cnnkit.engine.checkpoint import atomic_write_text

        self.names, self.size, self.out_dir, self.data = list(trained.names), trained.img_size, out_dir, data
        self.image_ids, self.category_ids, self.sizes = _result_ids(trained, paths, data, log)
        self.coco: list[dict] = []
        self.k = 0
        atomic_write_text(out_dir / "classes.txt", "".join(f"{n}\n" for n in self.names))  # read_yolo reads the folder

    def add(self, p, im, det) -> dict:
        from PIL import Image

        from cnnkit.engine.checkpoint import atomic_path, atomic_write_text
        from cnnkit.errors import DataError
        from cnnkit.tasks.detection_results import result_entries

        p = Path(p)
        h, w = im.shape[-2:]
        expected = self.sizes.get(p.resolve())
        if expected is not None and expected != (w, h):
            raise DataError(f"the image is {w}x{h} but its namesake in {self.data} is {expected[0]}x{expected[1]}",
                            path=str(p), fix="predict the dataset's own image, or leave out --data")
        size = self.size
        scale = torch.tensor([w / size, h / size, w / size, h / size], dtype=torch.float64)
        boxes = det["boxes"].double().cpu() * scale
        det = {"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}
        drawn = draw_detections(im, det, self.names, min_score=0.0)
        with atomic_path(self.out_dir / "images" / f"{p.stem}.png") as tmp:
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        lines = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f} {s:.5f}"
                 for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist())]
        self.coco += result_entries(det, self.image_ids[self.k], self.category_ids, file_name=p.name)
        self.k += 1
        atomic_write_text(self.out_dir / "labels" / f"{p.stem}.txt", "\n".join(lines) + ("\n" if lines else ""))
        summary = ", ".join(f"{self.names[c]} {s:.2f}" for s, c in
                            zip(det["scores"].tolist()[:5], det["labels"].tolist()[:5]))
        return {"path": str(p), "detections": len(lines),
                "summary": f"{p}: {len(lines)} objects" + (f" ({summary})" if summary else "")}

    def close(self) -> None:
        from cnnkit.tasks.detection_results import write_results

        write_results(self.out_dir / "predictions.json", self.coco)


def _result_ids(trained, paths, data, log):
    """(image ids, category ids, {resolved path: (w, h)}) of predictions.json; see `DetectionWriter`."""
    from cnnkit.tasks.detection_results import checkpoint_category_ids, dataset_ids_for_images, label_plus_one

    names = list(trained.names)
    if data is not None:
        config = (trained.ckpt.get("config") or {})
        image_ids, category_ids, sizes = dataset_ids_for_images(
            paths, data, names, on_bad_label=config.get("on_bad_label", "error"))
        log(f"predictions.json: image_id and category_id as in the COCO file of {data} "
            "(what `cnnkit data convert --to coco` writes for it)")
        return image_ids, category_ids, sizes
    image_ids = list(range(1, len(paths) + 1))
    category_ids = checkpoint_category_ids(trained.ckpt, len(names))
    if category_ids is None:
        category_ids = label_plus_one(len(names))
        log("predictions.json: category_id = class index + 1 (this checkpoint records no dataset "
            "category ids; checkpoints of this cnnkit version do), and image_id = 1..N in file order; "
            "give --data DATA for the dataset's ids")
    else:
        log(f"predictions.json: image_id = 1..{len(paths)} in file order (these images' dataset ids are "
            "unknown; give --data DATA to use them), category_id = the training data's category ids")
    return image_ids, category_ids, {}


class CocoResultsWriter(ResultWriter):
    """`cnnkit val --save-json`: the detections the evaluation scored, in each validation image's own
    pixels, with the image and category ids of the data's COCO file, as one COCO results file."""

    def __init__(self, data: TaskData, path: Path):
        self.dataset = data.val
        self.img_size = int(data.meta["img_size"])
        self.category_ids = list(data.meta.get("category_ids") or range(1, len(data.names) + 1))
        self.path = Path(path)
        self.entries: list[dict] = []
        self.images = 0

    def add(self, index: int, prediction: dict) -> None:
        from cnnkit.tasks.detection_results import result_entries

        rec = self.dataset.records[index]
        s = self.img_size
        scale = torch.tensor([rec.width / s, rec.height / s, rec.width / s, rec.height / s], dtype=torch.float64)
        det = {"boxes": prediction["boxes"].double() * scale, "scores": prediction["scores"],
               "labels": prediction["labels"]}
        self.entries += result_entries(det, self.dataset.image_id(index), self.category_ids)
        self.images += 1

    def close(self) -> list[str]:
        from cnnkit.tasks.detection_results import write_results

        write_results(self.path, self.entries)
        split = getattr(self.dataset, "split", None) or "val"
        where = f"annotations/instances_{split}.json of the data's COCO form (`cnnkit data convert DATA OUT --to coco`)"
        line = (f"{len(self.entries)} detections of {self.images} validation images, ids as in {where}, "
                f"written to {self.path}")
        if split != "val":
            line += (f"; the data has no val split, so these are held-out {split} images: evaluate on their "
                     "image ids only")
        return [line]


def draw_detections(image: torch.Tensor, det: dict, names: list[str], *, min_score: float = 0.25) -> torch.Tensor:
    """uint8 [3,H,W] image with its detections drawn: a box and 'class score' per detection."""
    from torchvision.utils import draw_bounding_boxes

    keep = det["scores"] >= min_score
    boxes, scores, labels = det["boxes"][keep].float(), det["scores"][keep], det["labels"][keep]
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if len(boxes) == 0:
        return image.clone()
    text = [f"{names[int(c)]} {float(s):.2f}" for s, c in zip(scores, labels)]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in labels]
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=2)


def as_tv_target(boxes: torch.Tensor, labels: torch.Tensor, canvas_size: tuple[int, int]) -> dict:
    """A target dict as the detection datasets yield it (handy for tests and user code)."""
    return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas_size),
            "labels": labels.long()}
