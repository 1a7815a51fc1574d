"""Semantic segmentation with encoder-decoder networks: data and mask-aware augmentation, the
per-pixel cross-entropy (ignore_index 255, optional class weights), mIoU from one confusion matrix,
prediction as index-mask PNGs and colour overlays.

Evaluation accumulates a single confusion matrix over every validation pixel (in the network's input
frame, img_size x img_size) and derives mIoU, per-class IoU and pixel accuracy from it
(`cnnkit.tasks.segmentation_metrics`), so the figures do not depend on the batch size. Predicted
masks for files are computed at each image's own size: the logits are resized bilinearly before the
argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.errors import UsageError
from cnnkit.taskapi import (NON_NEGATIVE, PROBABILITY, EvalState, PredictionWriter, ResultWriter, Task, TaskData,
                            TaskOptions, option, register_task)

IGNORE_INDEX = 255
MEDIAN_FREQUENCY = "median-frequency"
AUX_WEIGHT = 0.4  # the auxiliary classifier's cross-entropy (models built with aux_loss), PSPNet's weight


def parse_class_weights(spec, num_classes: int) -> list[float] | str | None:
    """`--class-weights`: empty (none), "median-frequency", or one number per class ("1,2,0.5")."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str) and spec.strip().lower() in (MEDIAN_FREQUENCY, "median_frequency", "balanced"):
        return MEDIAN_FREQUENCY
    values = spec if isinstance(spec, (list, tuple)) else str(spec).replace(",", " ").split()
    try:
        weights = [float(v) for v in values]
    except ValueError:
        raise UsageError(f"--class-weights {spec!r} is neither {MEDIAN_FREQUENCY} nor a list of numbers",
                         fix=f"give {num_classes} comma-separated numbers or {MEDIAN_FREQUENCY}") from None
    if len(weights) != num_classes:
        raise UsageError(f"--class-weights has {len(weights)} values for {num_classes} classes",
                         fix=f"give one weight per class ({num_classes})")
    if any(not (w >= 0.0) or w == float("inf") for w in weights):
        raise UsageError("--class-weights must be finite and >= 0", fix="e.g. --class-weights 0.5,1,1")
    return weights


def median_frequency_weights(dataset, num_classes: int, *, max_samples: int = 500) -> list[float]:
    """Eigen & Fergus (2015) median frequency balancing: w_c = median(f) / f_c, f_c = pixels of class c
    / pixels of the images where c appears; computed on up to `max_samples` untransformed masks."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.float64)
    transform, dataset.transform = dataset.transform, None
    try:
        for i in range(min(len(dataset), max_samples)):
            mask = dataset[i][1].as_subclass(torch.Tensor).reshape(-1)
            mask = mask[mask != IGNORE_INDEX]
            c = torch.bincount(mask, minlength=num_classes)[:num_classes].double()
            counts += c
            present += (c > 0).double() * mask.numel()
    finally:
        dataset.transform = transform
    freq = torch.where(present > 0, counts / present.clamp(min=1), torch.zeros_like(counts))
    seen = freq[freq > 0]
    if len(seen) == 0:
        return [1.0] * num_classes
    med = float(seen.median())
    return [med / float(f) if f > 0 else 0.0 for f in freq]


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """1 - the mean soft Dice coefficient 2 sum(p y) / (sum(p) + sum(y)) over the classes present in the
    batch's truth (Milletari et al. 2016, V-Net), p the softmax probabilities, y the one-hot truth, pixels
    of `ignore_index` left out; a +1 in numerator and denominator keeps it defined. Unlike cross-entropy it
    scores each class by its overlap, as IoU does, whatever the class's share of the pixels."""
    probs = logits.float().softmax(1)
    n_cls = probs.shape[1]
    valid = masks != ignore_index
    labels = torch.where(valid, masks, 0)
    # per class: sum of p over the valid pixels, sum of y (pixel count), sum of p y (p at the true class),
    # the last two by index_add / bincount over the labels rather than a one-hot tensor of the logits' size
    p_sum = (probs * valid.unsqueeze(1)).sum((0, 2, 3))
    p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)[valid]
    labels = labels[valid]
    truth = torch.bincount(labels, minlength=n_cls)[:n_cls].to(probs.dtype)
    present = truth > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    overlap = torch.zeros(n_cls, dtype=probs.dtype, device=probs.device).index_add_(0, labels, p_true)
    dice = (2 * overlap + 1) / (p_sum + truth + 1)
    return 1 - dice[present].mean()


def copy_paste(images: torch.Tensor, masks: torch.Tensor, p: float, *, background: int = 0,
               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-paste augmentation (Ghiasi et al. 2021, "Simple Copy-Paste is a Strong Data Augmentation Method
    for Instance Segmentation", CVPR) for semantic masks, within a batch: with probability p, image i gets the
    labelled pixels (class not `background`, not `ignore_index`) of image i - 1 of the batch, mirrored left to
    right, pasted over it; its mask takes their classes, so what they cover is gone from it, as an occluded
    object is. More objects per image for the same compute. Needs a batch of at least 2."""
    n = images.shape[0]
    if n < 2 or p <= 0:
        return images, masks
    pick = torch.rand(n, device=images.device) < p
    if not bool(pick.any()):
        return images, masks
    src_images, src_masks = images.roll(1, 0).flip(-1), masks.roll(1, 0).flip(-1)
    paste = (src_masks != background) & (src_masks != ignore_index) & pick.view(-1, 1, 1)
    out = torch.where(paste.unsqueeze(1), src_images, images)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out, torch.where(paste, src_masks, masks)


def aux_scores_and_truth(aux: torch.Tensor, masks: torch.Tensor, stride: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary classifier's coarse scores, bilinearly upsampled to 1/`stride` of the masks' size, and the
    masks sampled there (nearest: each coarse pixel takes the class at its centre; 255 stays 255). The deep
    features need the class of each region, not its exact edge, and the cross-entropy costs 1/stride^2."""
    h, w = masks.shape[-2:]
    size = (max(1, -(-h // stride)), max(1, -(-w // stride)))
    scores = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
    truth = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return scores, truth


@dataclass
class SegmentOptions(TaskOptions):
    dice_weight: float = option(0.0, "add this times the soft Dice loss (V-Net) to the cross-entropy (0 = "
                                "cross-entropy only)", type=NON_NEGATIVE)
    copy_paste: float = option(0.0, "chance per training image that the labelled pixels (not background 0, not "
                               "255) of another image of its batch, mirrored, are pasted over it (Ghiasi et al. "
                               "2021; 0 = off)", type=PROBABILITY)
    class_weights: str = option("", "cross-entropy class weights: empty (none), median-frequency, or one number "
                                "per class, comma-separated")
    upsample: str | None = option(None, "unet: how the decoder upsamples (default: the model's own)",
                                  choices=("transposed", "nearest", "bilinear"), model=True)
    output_stride: int | None = option(None, "unet: stride at which the decoder stops and the class scores are "
                                       "bilinearly upsampled to the image (1 = full-resolution decoder; default: "
                                       "the task's)", type=int, choices=(1, 2, 4), model=True)
    aux_loss: bool | None = option(None, "unet: an auxiliary classifier on the first decoder block, its "
                                   "cross-entropy added at weight 0.4 in training (PSPNet; default: the task's)",
                                   type=bool, model=True)


@register_task
class SegmentTask(Task):
    name = "segment"
    fitness = "mIoU"
    metric_names = ("loss", "mIoU", "pixel_accuracy", "mean_accuracy")
    Options = SegmentOptions
    # U-Net on the offline ImageNet EfficientNet-Lite0, scores at stride 4 upsampled bilinearly (DeepLabv3+'s
    # choice), the stride <= 4 layers frozen, a lighter decoder (128-64-48 channels: 1.5x cheaper steps than
    # 256-128-64), in-batch copy-paste, PSPNet's auxiliary classifier and cross-entropy + soft Dice: each measured
    # on the built-in scenes (BENCHMARKS.md)
    defaults = dict(model="unet", model_kwargs={"backbone": "efficientnet_lite0", "width": 1.0, "output_stride": 4,
                                                "decoder_channels": [128, 64, 48, 32, 16], "aux_loss": True},
                    config={"data": "scenes-seg", "img_size": 160, "batch_size": 16, "epochs": 8, "lr": 0.002,
                            "optimizer": "adamw", "weight_decay": 0.05, "clip_grad": 10.0, "warmup_epochs": 1.0,
                            "weights": "imagenet", "freeze_early": 4, "copy_paste": 1.0, "dice_weight": 1.0})
    figure = ("confusion_matrix.png", "pixel confusion matrix")
    score_meaning = "the image's mIoU over the classes in its truth or prediction"
    demo_minutes = 9.0  # of `fit` in `make demo`: with classify 5.0 and ~0.6 min of predict + report, under 25 min
    demo_quick_steps = 2
    saves = {"masks": "masks/<image stem>.png: the predicted index mask of each validation image as val scores it "
                      "(img-size x img-size; pixel = class index; 8-bit palette PNG, 16-bit over 255 classes)"}

    def __init__(self):
        self.class_weights: torch.Tensor | None = None
        self.dice_weight = 0.0
        self.copy_paste = 0.0
        self.img_size = 0

    # -- data ---------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        from cnnkit.data.segmentation import (load_segmentation_data, segment_eval_transform,
                                              segment_train_transform, segmentation_collate)

        d = load_segmentation_data(cfg.data)
        self.copy_paste = float(cfg.options.copy_paste or 0.0) if cfg.augment else 0.0
        d.train.transform = segment_train_transform(cfg.img_size, cfg.augment)
        d.val.transform = segment_eval_transform(cfg.img_size)
        meta = {"img_size": cfg.img_size, "channels": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
        weights = parse_class_weights(cfg.options.class_weights, len(d.names))
        if weights == MEDIAN_FREQUENCY:
            weights = median_frequency_weights(d.train, len(d.names))
        if weights is not None:
            meta["class_weights"] = [round(float(w), 6) for w in weights]
        if cfg.options.dice_weight:
            meta["dice_weight"] = float(cfg.options.dice_weight)
        self.configure(meta)
        return TaskData(d.train, d.val, list(d.names), collate_fn=segmentation_collate,
                        in_memory=bool(d.in_memory), source=d.source, meta=meta)

    def configure(self, meta: dict[str, Any]) -> None:
        self.configure_normalisation(meta)
        self.img_size = int(meta.get("img_size", 0) or 0)
        w = meta.get("class_weights")
        self.class_weights = torch.tensor(w, dtype=torch.float32) if w else None
        self.dice_weight = float(meta.get("dice_weight", 0.0) or 0.0)

    # -- model and loss -------------------------------------------------------------------------
    def build_model(self, cfg, data: TaskData):
        from cnnkit.models import build_model

        kwargs = dict(num_classes=len(data.names), img_size=cfg.img_size, **cfg.model_kwargs)
        if cfg.weights:
            kwargs.update(weights=cfg.weights, download=cfg.download)
        model = build_model(cfg.model, **kwargs)
        self.adopt_weights_normalisation(model, cfg, data)
        return model

    def _weight(self, device) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if self.class_weights.device != device:
            self.class_weights = self.class_weights.to(device)
        return self.class_weights

    def criterion(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the pixels that are not ignore_index (weighted mean with weights)."""
        if not bool((masks != IGNORE_INDEX).any()):
            return logits.sum() * 0.0  # an all-ignore batch: no signal, but a graph for backward
        return F.cross_entropy(logits.float(), masks, weight=self._weight(logits.device), ignore_index=IGNORE_INDEX)

    def loss(self, model, images, targets):
        """Cross-entropy, plus `dice_weight` x the soft Dice loss when set (`--dice-weight`); in training, first
        `copy_paste` (`--copy-paste`)."""
        if self.copy_paste and model.training:
            images, targets = copy_paste(images, targets, self.copy_paste)
        logits = model(images)
        parts: dict[str, float] = {}
        aux = None
        if isinstance(logits, tuple):  # a model built with aux_loss, in training mode: (scores, auxiliary scores)
            logits, aux = logits
        loss = ce = self.criterion(logits, targets)
        if aux is not None:
            aux_ce = self.criterion(*aux_scores_and_truth(aux, targets))
            loss = loss + AUX_WEIGHT * aux_ce
            parts.update(ce=float(ce.detach()), aux_ce=float(aux_ce.detach()))
        if self.dice_weight:
            dice = soft_dice_loss(logits, targets)
            loss = loss + self.dice_weight * dice
            parts.update(ce=float(ce.detach()), dice=float(dice.detach()))
        return loss, parts

    # -- evaluation -----------------------------------------------------------------------------
    def eval_start(self, names, device) -> EvalState:
        n_cls = len(names)
        return EvalState(sums={"cm": torch.zeros(n_cls, n_cls, dtype=torch.int64, device=device), "loss": 0.0, "n": 0},
                         lists={"examples": []})

    def eval_step(self, state: EvalState, logits, images, masks) -> list:
        from cnnkit.tasks.segmentation_metrics import confusion_matrix

        pred = logits.argmax(1)
        state.add(loss=float(self.criterion(logits, masks)) * logits.shape[0], n=logits.shape[0],
                  cm=confusion_matrix(pred, masks, logits.shape[1], ignore_index=IGNORE_INDEX))
        state.extend("examples", [(img.cpu(), p.cpu(), t.cpu()) for img, p, t in zip(images, pred, masks)], limit=8)
        return list(pred.cpu())

    def summarise(self, state: EvalState, names) -> dict[str, Any]:
        from cnnkit.tasks.segmentation_metrics import segmentation_scores

        cm, n = state.sums["cm"].cpu(), state.sums["n"]
        scores = segmentation_scores(cm, names)
        return {"loss": state.sums["loss"] / max(1, n), "mIoU": float(scores["mIoU"]),
                "pixel_accuracy": float(scores["pixel_accuracy"]), "mean_accuracy": float(scores["mean_accuracy"]),
                "images": n, "per_class_IoU": scores["per_class_IoU"], "confusion": cm,
                "examples": state.lists["examples"][:8]}

    def draw(self, metrics: dict[str, Any], out_dir: Path, *, names: list[str]) -> Path:
        from cnnkit.plots import plot_grid
        from cnnkit.tasks.segmentation_metrics import overlay, plot_segmentation_confusion

        out_dir = Path(out_dir)
        path = plot_segmentation_confusion(metrics["confusion"], names, out_dir / "confusion_matrix.png",
                                           title=f"mIoU {metrics['mIoU']:.3f}  pixel accuracy "
                                                 f"{metrics['pixel_accuracy']:.3f}")
        pics, caps = [], []
        for img, pred, truth in metrics.get("examples", []):
            pics += [img.permute(1, 2, 0).numpy(),
                     overlay(img, truth, num_classes=len(names)).permute(1, 2, 0).numpy(),
                     overlay(img, pred, num_classes=len(names)).permute(1, 2, 0).numpy()]
            caps += ["image", "truth", "prediction"]
        if pics:
            plot_grid(pics, caps, out_dir / "val_predictions.png", cols=6)
        return path

    def result_writer(self, kinds, data: TaskData, out_dir) -> ResultWriter:
        if tuple(kinds) != ("masks",):
            return super().result_writer(kinds, data, out_dir)
        return MaskWriter([Path(image) for image, _ in data.val.pairs], len(data.names), Path(out_dir) / "masks")

    # -- per-image scores (the run report's gallery) ----------------------------------------------
    def score_batch(self, logits, targets) -> list[tuple[float, Any]]:
        """Per image (score, predicted mask); the score is the image's own mIoU over the classes in its
        truth or prediction (ignore pixels left out; 0.0 when all are ignored)."""
        from cnnkit.tasks.segmentation_metrics import confusion_matrix, segmentation_scores

        n_cls = logits.shape[1]
        preds = logits.float().argmax(1).cpu()
        classes = [str(c) for c in range(n_cls)]
        return [(float(segmentation_scores(confusion_matrix(p, t, n_cls, ignore_index=IGNORE_INDEX), classes)["mIoU"]),
                 p.to(torch.uint8 if n_cls <= 256 else torch.int32))
                for p, t in zip(preds, targets.cpu())]

    def draw_example(self, image, target, prediction, score: float, names: list[str]) -> list[tuple[Any, str]]:
        """Image, truth and prediction overlays of one image (as `draw` shows them): [(HxWx3 uint8, caption)] x 3."""
        from cnnkit.tasks.segmentation_metrics import overlay

        return [(image.permute(1, 2, 0).numpy(), f"mIoU {score:.2f}"),
                (overlay(image, target, num_classes=len(names)).permute(1, 2, 0).numpy(), "truth"),
                (overlay(image, prediction, num_classes=len(names)).permute(1, 2, 0).numpy(), "prediction")]

    # -- prediction -----------------------------------------------------------------------------
    def predict_step(self, trained, logits, options) -> list:
        return list(logits.float())

    def prediction_writer(self, trained, paths, out_dir, options, log) -> PredictionWriter:
        """Each image segmented at its own size: masks/<stem>.png (`mask_png`: pixel value = class index, an
        8-bit PNG in the VOC colours) and overlays/<stem>.png (the image with the classes blended in)."""
        return MaskFileWriter(trained.names, Path(out_dir), int(options.get("top_k") or 5))

    # -- data check, export, demo ----------------------------------------------------------------
    def check_data(self, spec, *, decode: bool = True):
        from cnnkit.data.check import check_segmentation

        return check_segmentation(spec, self.name, decode=decode)

    def export_outputs(self, with_nms: bool) -> list[str]:
        return ["logits [N, classes, H, W]"]

    def demo_predict(self, trained, run_dir, cfg) -> None:
        from cnnkit.tasks.detect import scenes_demo_predict

        scenes_demo_predict(trained, run_dir)

    def demo_lines(self, cfg, metrics, run_dir, epochs: int, minutes: float) -> list[str]:
        from cnnkit.tasks.detect import scenes_demo_headline

        return [scenes_demo_headline(cfg, epochs, minutes),
                f"      held-out 300 scenes: mIoU {metrics['mIoU']:.3f}, pixel accuracy {metrics['pixel_accuracy']:.3f}",
                f"      {run_dir}/confusion_matrix.png, val_predictions.png, predict/overlays/"]


class MaskFileWriter(PredictionWriter):
    """`cnnkit predict` of a segmenter: masks/<stem>.png and overlays/<stem>.png at each image's own size."""

    def __init__(self, names: list[str], out_dir: Path, top_k: int):
        self.names, self.out_dir, self.top_k = names, out_dir, top_k

    def add(self, p, im, logits) -> dict:
        from PIL import Image

        from cnnkit.engine.checkpoint import atomic_path
        from cnnkit.tasks.segmentation_metrics import overlay

        p, names = Path(p), self.names
        h, w = im.shape[-2:]
        mask = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
        png = mask_png(mask, len(names))
        with atomic_path(self.out_dir / "masks" / f"{p.stem}.png") as tmp:
            png.save(tmp, format="PNG")
        blended = overlay(im, mask, num_classes=len(names))
        with atomic_path(self.out_dir / "overlays" / f"{p.stem}.png") as tmp:
            Image.fromarray(blended.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        counts = torch.bincount(mask.reshape(-1), minlength=len(names))
        share = [(int(c), float(v) / mask.numel()) for c, v in enumerate(counts.tolist()) if v]
        share.sort(key=lambda t: -t[1])
        summary = ", ".join(f"{names[c]} {s:.0%}" for c, s in share[:self.top_k])
        return {"path": str(p), "classes": {names[c]: s for c, s in share}, "summary": f"{p}: {summary}"}


def mask_png(mask: torch.Tensor, num_classes: int):
    """An index mask as a PIL image: 8-bit with the VOC palette for up to 255 classes (255 is the
    ignore value), 16-bit grey above; either way the pixel value is the class index."""
    import numpy as np
    from PIL import Image

    from cnnkit.tasks.segmentation_metrics import voc_palette

    if num_classes <= 255:
        png = Image.fromarray(mask.to(torch.uint8).numpy(), mode="L").convert("P")
        png.putpalette([v for rgb in voc_palette(256) for v in rgb])
        return png
    return Image.fromarray(mask.numpy().astype(np.uint16))


class MaskWriter(ResultWriter):
    """`cnnkit val --save-masks`: each validation image's predicted mask, as the evaluation scored it, in
    `folder`/<image stem>.png (a stem several images share gets _1, _2 ... in validation order)."""

    def __init__(self, image_paths: list[Path], num_classes: int, folder: Path):
        self.folder, self.num_classes = Path(folder), int(num_classes)
        self.names, taken = [], set()
        for p in image_paths:
            stem, k = p.stem, 1
            while stem.lower() in taken:
                stem, k = f"{p.stem}_{k}", k + 1
            taken.add(stem.lower())
            self.names.append(f"{stem}.png")
        self.written, self.size = 0, None

    def add(self, index: int, prediction: torch.Tensor) -> None:
        from cnnkit.engine.checkpoint import atomic_path

        with atomic_path(self.folder / self.names[index]) as tmp:
            mask_png(prediction, self.num_classes).save(tmp, format="PNG")
        self.written += 1
        self.size = tuple(prediction.shape[-2:])

    def close(self) -> list[str]:
        frame = f" at {self.size[1]}x{self.size[0]}, the size val scores them at," if self.size else ""
        return [f"{self.written} predicted masks{frame} (pixel = class index) written to {self.folder}"]
