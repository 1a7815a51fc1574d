"""Object detection with YOLO (Redmon et al. 2016): data and augmentation, the loss, evaluation
(COCO AP through faster-coco-eval, VOC2007 11-point AP50), prediction and drawing.

The augmentation is the paper's: random scaling and translation of up to 20% of the image size,
random exposure and saturation of up to 1.5x, plus horizontal flips; every transform is box-aware
(torchvision transforms.v2) and boxes are sanitised after them. Evaluation runs in the network's
input frame (images resized to img_size x img_size); predictions are mapped back to each image's
own pixels only when predicting files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cnnkit.engine import distributed as dist
from cnnkit.tasks.base import ResultWriter, Task, TaskData, square_batches

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def train_transform(img_size: int, augment: bool = True):
    resize = [v2.Resize((img_size, img_size), antialias=True)]
    if not augment:
        return v2.Compose(resize + [v2.SanitizeBoundingBoxes()])
    return v2.Compose([
        v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2)),
        v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
        v2.RandomHorizontalFlip(),
        *resize,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=2.0),
    ])


def eval_transform(img_size: int):
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True), v2.ClampBoundingBoxes(),
                       v2.SanitizeBoundingBoxes(min_size=1.0)])


class DetectTask(Task):
    name = "detect"
    fitness = "AP50"
    metric_names = ("loss", "AP", "AP50", "AP75", "mAP50_voc07")
    saves = {"json": "predictions.json: the validation detections val scores (confidence >= 0.001, at most 100 "
                     "an image) in COCO results format, with the dataset's image and category ids"}

    def __init__(self):
        self.conf_threshold = 0.001  # evaluation keeps low-score boxes: AP integrates over all of them
        self.iou_threshold = 0.5
        self.max_det = 100
        self.geometry: dict[str, int] = {}

    # -- data ---------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        from cnnkit.data.detection import detection_collate, load_detection_data

        d = load_detection_data(cfg.data, on_bad_label=cfg.on_bad_label)
        d.train.transform = train_transform(cfg.img_size, cfg.augment)
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
        pred = model(images)
        target = encode_targets([t["boxes"] for t in targets], [t["labels"] for t in targets],
                                S=g["S"], C=g["C"], img_size=g["img_size"])
        loss, parts = yolo_loss(pred.float(), target, S=g["S"], B=g["B"], C=g["C"])
        return loss, {k: float(v) for k, v in parts.items()}

    def detect(self, model, images: torch.Tensor, *, conf_threshold: float | None = None) -> list[dict]:
        """Batched inference: float images [N,3,H,W] in the model frame -> one dict per image."""
        from cnnkit.tasks.yolo import postprocess

        g = self._shape(model)
        pred = model(images).float()
        return postprocess(pred, S=g["S"], B=g["B"], C=g["C"], img_size=g["img_size"],
                           conf_threshold=self.conf_threshold if conf_threshold is None else conf_threshold,
                           iou_threshold=self.iou_threshold, max_det=self.max_det)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model, loader, *, device, precision, names, channels_last=False) -> dict[str, Any]:
        from cnnkit.engine.loop import to_device
        from cnnkit.tasks.detection_metrics import coco_metrics, voc07_and_curves
        from cnnkit.tasks.yolo import encode_targets, postprocess, yolo_loss

        g = self._shape(model)
        preds, gts, examples = [], [], []
        loss_sum, n = 0.0, 0
        for images, targets in loader:
            x = to_device(images, self, device, channels_last)
            tg = self.move_targets(targets, device)
            with precision.autocast():
                raw = model(x)
            raw = raw.float()
            enc = encode_targets([t["boxes"] for t in tg], [t["labels"] for t in tg], S=g["S"], C=g["C"],
                                 img_size=g["img_size"])
            loss_sum += float(yolo_loss(raw, enc, S=g["S"], B=g["B"], C=g["C"])[0]) * x.shape[0]
            n += x.shape[0]
            out = postprocess(raw, S=g["S"], B=g["B"], C=g["C"], img_size=g["img_size"],
                              conf_threshold=self.conf_threshold, iou_threshold=self.iou_threshold,
                              max_det=self.max_det)
            for img, p, t in zip(images, out, tg):
                preds.append({k: v.cpu() for k, v in p.items()})
                gts.append({k: v.cpu() for k, v in t.items()})
                if len(examples) < 16:
                    examples.append(img.cpu())
        if dist.is_sharded(loader):  # torchrun: every process's detections, in validation-set order
            preds, gts, examples = dist.gather_ordered(preds), dist.gather_ordered(gts), dist.gather_ordered(examples)[:16]
            loss_sum, n = dist.sum_across(loss_sum, n)
        if self.on_prediction is not None:  # `cnnkit val --save-json`: the detections scored here
            for i, p in enumerate(preds):
                self.on_prediction(i, p)
        coco = coco_metrics(preds, gts, names)
        voc, curves = voc07_and_curves(preds, gts, names)
        return {"loss": loss_sum / max(1, n), "AP": float(coco["AP"]), "AP50": float(coco["AP50"]),
                "AP75": float(coco["AP75"]), "mAP50_voc07": float(voc["mAP50_voc07"]), "images": n,
                "per_class_AP50": coco.get("per_class_AP50", {}), "per_class_AP": coco.get("per_class_AP", {}),
                "pr_curves": curves,
                "examples": (examples, preds[:len(examples)], gts[:len(examples)])}

    def draw(self, metrics: dict[str, Any], out_dir: Path, *, names: list[str]) -> Path:
        from cnnkit.tasks.detection_metrics import plot_pr_curves
        from cnnkit.tasks.plots import plot_grid

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
    @torch.no_grad()
    def score_images(self, model, images, targets, *, device, precision, channels_last=False,
                     conf_threshold: float = 0.25) -> list[tuple[float, Any]]:
        """One validation batch -> per image (score, prediction). The score is the F1 of the detections
        kept at `conf_threshold` (predict's default), matched to the truth at IoU 0.5 as VOC matches
        them: 2 TP / (2 TP + FP + FN); 1.0 for an image with neither objects nor detections."""
        from cnnkit.engine.loop import to_device
        from cnnkit.tasks.detection_metrics import _match_voc, _unpack

        with precision.autocast():
            dets = self.detect(model, to_device(images, self, device, channels_last), conf_threshold=conf_threshold)
        n_cls = int(model.num_classes)
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
    @torch.no_grad()
    def predict_paths(self, trained, sources, *, out_dir, top_k: int = 5, batch_size: int = 16,
                      conf_threshold: float = 0.25, data=None, log=print) -> list[dict]:
        """Detect objects in every image of `sources`; writes per image a drawn PNG (images/) and a YOLO
        txt (labels/, `class cx cy w h score`, normalised; classes.txt names the classes), plus
        predictions.json in COCO results format (`cnnkit.tasks.detection_results`).

        Its ids: with `data` (the dataset, as `--data` takes it) each image's id in that dataset's COCO
        file (found by path, else by file name; an image not in it is a DataError) and its category
        ids; without, image ids 1..N in file order and the category ids the checkpoint recorded
        (label + 1 for a checkpoint that has none). `log` gets one line saying which."""
        from PIL import Image

        from cnnkit.data.sources import collect_image_paths
        from cnnkit.engine.checkpoint import atomic_path, atomic_write_text
        from cnnkit.errors import DataError
        from cnnkit.tasks.detection_results import (checkpoint_category_ids, dataset_ids_for_images,
                                                    label_plus_one, result_entries, write_results)

        paths = collect_image_paths(sources)
        names = list(trained.names)
        sizes = {}
        if data is not None:
            config = (trained.ckpt.get("config") or {})
            image_ids, category_ids, sizes = dataset_ids_for_images(
                paths, data, names, on_bad_label=config.get("on_bad_label", "error"))
            log(f"predictions.json: image_id and category_id as in the COCO file of {data} "
                "(what `cnnkit data convert --to coco` writes for it)")
        else:
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
        size = trained.img_size
        out_dir = Path(out_dir)
        rows, coco = [], []
        atomic_write_text(out_dir / "classes.txt", "".join(f"{n}\n" for n in names))  # read_yolo reads the folder
        k = 0
        for chunk, originals, x in square_batches(trained, paths, batch_size, self.prepare):
            with trained.precision.autocast():
                dets = self.detect(trained.model, x, conf_threshold=conf_threshold)
            for p, im, det in zip(chunk, originals, dets):
                h, w = im.shape[-2:]
                expected = sizes.get(Path(p).resolve())
                if expected is not None and expected != (w, h):
                    raise DataError(f"the image is {w}x{h} but its namesake in {data} is {expected[0]}x{expected[1]}",
                                    path=str(p), fix="predict the dataset's own image, or leave out --data")
                scale = torch.tensor([w / size, h / size, w / size, h / size], dtype=torch.float64)
                boxes = det["boxes"].double().cpu() * scale
                det = {"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}
                drawn = draw_detections(im, det, trained.names, min_score=0.0)
                with atomic_path(out_dir / "images" / f"{p.stem}.png") as tmp:
                    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
                lines = []
                for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
                    lines.append(f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                                 f"{(y2 - y1) / h:.6f} {s:.5f}")
                coco += result_entries(det, image_ids[k], category_ids, file_name=p.name)
                atomic_write_text(out_dir / "labels" / f"{p.stem}.txt", "\n".join(lines) + ("\n" if lines else ""))
                summary = ", ".join(f"{trained.names[c]} {s:.2f}" for s, c in
                                    zip(det["scores"].tolist()[:5], det["labels"].tolist()[:5]))
                rows.append({"path": str(p), "detections": len(lines), "summary": f"{p}: {len(lines)} objects"
                             + (f" ({summary})" if summary else "")})
                k += 1
        write_results(out_dir / "predictions.json", coco)
        return rows


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
