"""Image classification: cross-entropy, top-1 / top-5 / per-class accuracy, confusion matrix,
top-k prediction with class names.

Top-k accuracy (as ImageNet reports it): a sample counts as correct when its true class is among
the k highest scores. Per-class accuracy is the confusion matrix's diagonal over its row sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cnnkit.data.images import to_channels
from cnnkit.taskapi import (COUNT, FRACTION, PROBABILITY, EvalState, PredictionWriter, Task, TaskData, TaskOptions,
                            at_least_fp32, number, option, register_task)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.25,) * channels


def small_source(img_size: int, source_size: int) -> bool:
    """Images at most 1.5x the input size (e.g. 28-px Fashion-MNIST into 32): augmented as a batch."""
    return source_size <= 1.5 * img_size


def train_transform(img_size: int, source_size: int, augment: bool):
    """The per-image part of training augmentation. Small sources: only fitted to the input size (their
    pad-and-crop, flip and erasing run on the whole batch: `SmallImageAugment`). Larger photos:
    random-resized crop and flip (the Inception / ResNet recipe)."""
    if not augment or small_source(img_size, source_size):
        return eval_transform(img_size)
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.25, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()])


class SmallImageAugment:
    """Training augmentation of small images, done on the whole normalised batch where it lands (CPU or
    GPU) instead of image by image in the loader: zero-padding by img_size // 8 on every side and a random
    crop back to the input size, a horizontal flip with probability 0.5, and random erasing (Zhong et al.
    2020) with probability `erasing`: a rectangle of 2-25% of the image, aspect ratio log-uniform in
    [0.3, 3.3], the first of 10 draws that fits, set to black. "Zero" and "black" are the pixel value 0
    after normalisation, `fill` ([C] values, given with each batch). Random numbers come from torch's CPU
    generator, so a resumed run draws what the interrupted one would have."""

    ATTEMPTS = 10

    def __init__(self, img_size: int, erasing: float):
        self.pad = max(1, img_size // 8)
        self.erasing = float(erasing)

    def __call__(self, x: torch.Tensor, fill) -> torch.Tensor:
        n, c, h, w = x.shape
        p, dev = self.pad, x.device
        fill = torch.as_tensor(fill, dtype=x.dtype).view(1, c, 1, 1).to(dev)
        padded = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        top = torch.randint(0, 2 * p + 1, (n,)).to(dev).view(n, 1, 1, 1)
        left = torch.randint(0, 2 * p + 1, (n,)).to(dev).view(n, 1, 1, 1)
        rows = (top + torch.arange(h, device=dev).view(1, 1, h, 1)).expand(n, c, h, w + 2 * p)
        cols = (left + torch.arange(w, device=dev).view(1, 1, 1, w)).expand(n, c, h, w)
        out = padded.gather(2, rows).gather(3, cols)
        flip = (torch.rand(n) < 0.5).to(dev).view(n, 1, 1, 1)
        out = torch.where(flip, out.flip(3), out)
        if self.erasing:
            out = torch.where(self.erase_mask(n, h, w).to(dev), fill, out)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def erase_mask(self, n: int, h: int, w: int) -> torch.Tensor:
        """[n, 1, h, w] bool: the rectangle erased in each image (none where it is not erased)."""
        k = self.ATTEMPTS
        erase = torch.rand(n) < self.erasing
        area = h * w * torch.empty(n, k).uniform_(0.02, 0.25)
        aspect = torch.exp(torch.empty(n, k).uniform_(math.log(0.3), math.log(3.3)))
        eh, ew = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
        fits = (eh < h) & (ew < w)
        first = fits.long().argmax(1, keepdim=True)  # the first draw that fits (0 where none does)
        eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
        erase &= fits.any(1)
        i = (torch.rand(n) * (h - eh + 1)).long()
        j = (torch.rand(n) * (w - ew + 1)).long()
        r, q = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        inside = ((r >= i.view(n, 1, 1)) & (r < (i + eh).view(n, 1, 1)) &
                  (q >= j.view(n, 1, 1)) & (q < (j + ew).view(n, 1, 1)))
        return (inside & erase.view(n, 1, 1)).unsqueeze(1)


class FitTo(torch.nn.Module):
    """Bring an image to img_size x img_size, decided per image: one slightly smaller (3/4 of the
    size or more) is zero-padded around its centre, which keeps small images sharp (28x28
    Fashion-MNIST into 32x32); any other has its shorter side resized to img_size / crop_pct
    (ImageNet evaluation: 256 for 224, crop_pct 0.875), then is centre-cropped. A batch [N, C, H, W]
    of equal-sized images is fitted as each of its images would be (`batchable`)."""

    batchable = True

    def __init__(self, img_size: int, crop_pct: float = 1.0):
        super().__init__()
        self.img_size = img_size
        self.crop = v2.CenterCrop(img_size)
        self.resize = v2.Resize(int(round(img_size / crop_pct)), antialias=True)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        side = max(img.shape[-2:])
        if side > self.img_size or side < 0.75 * self.img_size:
            img = self.resize(img)
        return self.crop(img)  # CenterCrop pads with zeros where the image is smaller


def eval_transform(img_size: int, crop_pct: float = 1.0):
    return FitTo(img_size, crop_pct)


def stratified_subset(dataset, n: int) -> torch.utils.data.Subset:
    """The first ceil(n / classes) items of each class (in dataset order), n in all: deterministic."""
    labels = torch.as_tensor(dataset.labels) if hasattr(dataset, "labels") else \
        torch.tensor([dataset[i][1] for i in range(len(dataset))])
    classes = labels.unique()
    per_class = -(-n // len(classes))
    picked = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in classes])
    return torch.utils.data.Subset(dataset, picked.sort().values[:n].tolist())


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C[i, j] = number of samples of true class i predicted as j."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class ClassifyOptions(TaskOptions):
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", type=FRACTION)
    train_subset: int = option(0, "train on a stratified subset of this many images (0 = all)", type=COUNT)
    on_bad_image: str = option("error", "what a corrupt image does", choices=("error", "skip"))
    erasing: float = option(0.5, "random erasing's probability per training image (Zhong et al. 2020; small "
                            "images such as Fashion-MNIST only; 0 = off)", type=PROBABILITY)


@register_task
class ClassifyTask(Task):
    name = "classify"
    fitness = "top1"
    metric_names = ("loss", "top1", "top5")
    Options = ClassifyOptions
    defaults = dict(model="vgg11_bn", model_kwargs={"width": 0.25, "pool_size": 1, "dropout": 0.2}, config={})
    figure = ("confusion_matrix.png", "confusion matrix")
    score_meaning = "probability of the true class"
    predict_flags = {"--top-k": dict(type=number(int, 1), default=5, help="classify: classes listed per image")}
    demo_minutes = 5.0  # of `fit` in `make demo`: the 5 min of issue #16 (BENCHMARKS.md: the demo's time budgets)

    def __init__(self):
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD
        self.label_smoothing = 0.0
        self.batch_augment: SmallImageAugment | None = None

    # -- data ---------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        from cnnkit.data import load_classification_data

        d = load_classification_data(cfg.data, on_bad_image=cfg.options.on_bad_image)
        train = d.train
        first = d.train[0][0]
        source_size = max(first.shape[-2:])
        self.mean, self.std = default_normalisation(d.channels)
        self.label_smoothing = cfg.options.label_smoothing
        d.train.transform = train_transform(cfg.img_size, source_size, cfg.augment)
        self.batch_augment = None
        if cfg.augment and small_source(cfg.img_size, source_size):
            self.batch_augment = SmallImageAugment(cfg.img_size, cfg.options.erasing)
        d.val.transform = eval_transform(cfg.img_size)
        source = d.source
        if cfg.options.train_subset:
            train = stratified_subset(d.train, cfg.options.train_subset)
            source += f", training on a stratified subset of {len(train)}"
        meta = {"img_size": cfg.img_size, "channels": d.channels, "mean": list(self.mean), "std": list(self.std)}
        return TaskData(train, d.val, list(d.names), in_memory=bool(getattr(d, "in_memory", True)),
                        source=source, meta=meta, skipped=list(d.skipped))

    # -- model and loss -------------------------------------------------------------------------
    def build_model(self, cfg, data: TaskData):
        from cnnkit.models import build_model

        kwargs = dict(num_classes=len(data.names), in_channels=data.meta["channels"], **cfg.model_kwargs)
        if cfg.weights:
            kwargs.update(weights=cfg.weights, download=cfg.download)
        model = build_model(cfg.model, **kwargs)
        self.adopt_weights_normalisation(model, cfg, data)
        return model

    def loss(self, model, images, targets):
        if self.batch_augment is not None and model.training:
            black = [-m / s for m, s in zip(self.mean, self.std)]  # pixel value 0, normalised as `prepare` does
            images = self.batch_augment(images, black)
        logits = model(images)
        return F.cross_entropy(at_least_fp32(logits), targets, label_smoothing=self.label_smoothing), {}

    # -- evaluation -----------------------------------------------------------------------------
    def eval_start(self, names, device) -> EvalState:
        n_cls = len(names)
        return EvalState(sums={"cm": torch.zeros(n_cls, n_cls, dtype=torch.long), "top1": 0, "top5": 0,
                               "loss": 0.0, "n": 0})

    def eval_step(self, state: EvalState, logits, images, labels) -> list:
        n_cls = state.sums["cm"].shape[0]
        hits = topk_correct(logits, labels)
        state.add(loss=float(F.cross_entropy(logits, labels, reduction="sum")), top1=hits[1], top5=hits[5],
                  n=labels.numel(), cm=confusion_matrix(logits.argmax(1), labels, n_cls).cpu())
        return logits.argmax(1).tolist()

    def summarise(self, state: EvalState, names) -> dict[str, Any]:
        s = state.sums
        cm, n = s["cm"], s["n"]
        per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
        return {"loss": s["loss"] / max(1, n), "top1": s["top1"] / max(1, n), "top5": s["top5"] / max(1, n),
                "images": n, "per_class": dict(zip(names, per_class)), "confusion": cm.tolist()}

    def draw(self, metrics: dict[str, Any], out_dir: Path, *, names: list[str]) -> Path:
        from cnnkit.plots import plot_confusion

        return plot_confusion(metrics["confusion"], names, Path(out_dir) / "confusion_matrix.png",
                              title=f"top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}")

    # -- per-image scores (the run report's gallery) ----------------------------------------------
    def score_batch(self, logits, targets) -> list[tuple[float, Any]]:
        """Per image (score, prediction); the score is the probability of the true class."""
        probs = logits.float().softmax(dim=1).cpu()
        p_true = probs.gather(1, targets.cpu().long().view(-1, 1)).flatten()
        conf, pred = probs.max(dim=1)
        return [(float(s), (int(c), float(p))) for s, c, p in zip(p_true, pred, conf)]

    def draw_example(self, image, target, prediction, score: float, names: list[str]) -> list[tuple[Any, str]]:
        """The image, captioned with its true class, the prediction and the score: [(HxW[x3] uint8, caption)]."""
        pred, prob = prediction
        caption = f"p(true) {score:.2f}\n{names[int(target)]} -> {names[pred]} {prob:.2f}"
        return [(image.permute(1, 2, 0).squeeze(-1).numpy(), caption)]

    # -- prediction -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, images: torch.Tensor, k: int = 5, precision=None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [N,C,H,W] (already resized) -> (top-k probabilities, top-k class indices)."""
        x = self.prepare(images)
        if precision is not None:
            with precision.autocast():
                logits = model(x)
        else:
            logits = model(x)
        probs = logits.float().softmax(dim=1)
        return probs.topk(min(k, probs.shape[1]), dim=1)

    def predict_inputs(self, trained, paths):
        """Decoded files, brought to the model's channels, fitted to its input as validation images are."""
        from cnnkit.data.images import decode_image

        pre = trained.ckpt.get("preprocess", {})
        channels = int(pre.get("channels", 3))
        tf = eval_transform(trained.img_size, float(pre.get("crop_pct", 1.0)))
        imgs = [tf(to_channels(decode_image(p), channels)) for p in paths]
        return imgs, torch.stack(imgs)

    def predict_step(self, trained, logits, options) -> list:
        probs = logits.float().softmax(dim=1)
        top = probs.topk(min(int(options.get("top_k") or 5), probs.shape[1]), dim=1)
        return list(zip(top.values.tolist(), top.indices.tolist()))

    def prediction_writer(self, trained, paths, out_dir, options, log) -> PredictionWriter:
        return TopKWriter(trained.names, Path(out_dir), int(options.get("top_k") or 5))

    def from_pretrained(self, model):
        """ImageNet-style preprocessing and the weights' class names (class_i when they carry none)."""
        pre = dict(getattr(model, "cnnkit_preprocess", None) or {})
        names = list(getattr(model, "cnnkit_categories", None) or [])
        n_out = getattr(model, "num_classes", None) or len(names)
        names = names or [f"class_{i}" for i in range(n_out)]
        pre.setdefault("img_size", 224)
        pre.setdefault("mean", list(IMAGENET_MEAN))
        pre.setdefault("std", list(IMAGENET_STD))
        pre.setdefault("crop_pct", 0.875)
        pre.setdefault("channels", getattr(model, "in_channels", 3))
        return pre, names

    # -- data check, export, demo ----------------------------------------------------------------
    def check_data(self, spec, *, decode: bool = True):
        from cnnkit.data.check import check_classification

        return check_classification(spec, self.name, decode=decode)

    def export_outputs(self, with_nms: bool) -> list[str]:
        return ["logits [N, classes]"]

    def demo_predict(self, trained, run_dir, cfg) -> None:
        from cnnkit.engine.predictor import predict_files

        samples = write_samples(Path(run_dir) / "samples", cfg.data, n=32)
        predict_files(trained, [samples], out_dir=Path(run_dir) / "predict", options={"top_k": 3})

    def demo_lines(self, cfg, metrics, run_dir, epochs: int, minutes: float) -> list[str]:
        budget = f" (budget {cfg.time:g} min)" if cfg.time else ""
        return [f"demo: {cfg.model} (width {cfg.model_kwargs.get('width', 1.0)}) trained {epochs} epochs on "
                f"8,000 Fashion-MNIST images in {minutes:.1f} min{budget}",
                f"      held-out 2,000 images: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}",
                f"      {run_dir}/metrics.csv, results.png, confusion_matrix.png, predict/predictions.png"]


class TopKWriter(PredictionWriter):
    """predictions.csv, predictions.json and predictions.png (an annotated grid of the first 48), atomically."""

    def __init__(self, names: list[str], out_dir: Path, top_k: int):
        self.names, self.out_dir, self.top_k = names, out_dir, top_k
        self.rows: list[dict] = []
        self.thumbs: list = []

    def add(self, path, original, prediction) -> dict:
        pr, ix = prediction
        top = [{"class": self.names[i], "index": i, "prob": round(q, 6)} for q, i in zip(pr, ix)]
        row = {"path": str(path), "top": top,
               "summary": f"{path}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top[:3])}
        self.rows.append(row)
        if len(self.thumbs) < 48:
            self.thumbs.append((original, f"{self.names[ix[0]]} {pr[0]:.2f}"))
        return row

    def close(self) -> None:
        import csv
        import io
        import json

        from cnnkit.plots import plot_grid
        from cnnkit.engine.checkpoint import atomic_write_text

        buf = io.StringIO()
        w = csv.writer(buf)
        k = len(self.rows[0]["top"]) if self.rows else self.top_k
        w.writerow(["path"] + [f"{c}{j + 1}" for j in range(k) for c in ("class", "prob")])
        for r in self.rows:
            w.writerow([r["path"]] + [v for t in r["top"] for v in (t["class"], t["prob"])])
        atomic_write_text(self.out_dir / "predictions.csv", buf.getvalue())
        atomic_write_text(self.out_dir / "predictions.json",
                          json.dumps([{k: r[k] for k in ("path", "top")} for r in self.rows], indent=1))
        if self.thumbs:
            pics = [(t[0].permute(1, 2, 0).squeeze(-1).numpy()) for t in self.thumbs]
            plot_grid(pics, [t[1] for t in self.thumbs], self.out_dir / "predictions.png")


def write_samples(folder: Path, data: str, n: int) -> Path:
    """Save the first n validation images as PNG files, so prediction runs on real files."""
    from PIL import Image

    from cnnkit.data import load_classification_data

    d = load_classification_data(data)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(n, len(d.val))):
        img, label = d.val[i]
        Image.fromarray(img.squeeze(0).numpy()).save(folder / f"{i:03d}_{d.names[label].replace('/', '-')}.png")
    return folder


_to_channels = to_channels  # the name earlier versions used
