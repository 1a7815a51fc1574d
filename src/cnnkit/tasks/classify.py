"""Image classification: cross-entropy, top-1 / top-5 / per-class accuracy, confusion matrix,
top-k prediction with class names.

Top-k accuracy (as ImageNet reports it): a sample counts as correct when its true class is among
the k highest scores. Per-class accuracy is the confusion matrix's diagonal over its row sums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cnnkit.engine import distributed as dist
from cnnkit.tasks.base import Task, TaskData, at_least_fp32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.25,) * channels


def train_transform(img_size: int, source_size: int, augment: bool):
    """Small sources (<= 1.5x the input size, e.g. MNIST): fit, pad-and-crop, flip, random erasing
    (Zhong et al. 2020).
    Larger photos: random-resized crop and flip (the Inception / ResNet recipe)."""
    if not augment:
        return eval_transform(img_size)
    if source_size <= 1.5 * img_size:
        return v2.Compose([FitTo(img_size),
                           v2.RandomCrop(img_size, padding=max(1, img_size // 8)),
                           v2.RandomHorizontalFlip(),
                           v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0)])
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.25, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()])


class FitTo(torch.nn.Module):
    """Bring an image to img_size x img_size, decided per image: one slightly smaller (3/4 of the
    size or more) is zero-padded around its centre, which keeps small images sharp (28x28
    Fashion-MNIST into 32x32); any other has its shorter side resized to img_size / crop_pct
    (ImageNet evaluation: 256 for 224, crop_pct 0.875), then is centre-cropped."""

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


class ClassifyTask(Task):
    name = "classify"
    fitness = "top1"
    metric_names = ("loss", "top1", "top5")

    def __init__(self):
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD
        self.label_smoothing = 0.0

    # -- data ---------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        from cnnkit.data import load_classification_data

        d = load_classification_data(cfg.data, on_bad_image=cfg.on_bad_image)
        train = d.train
        first = d.train[0][0]
        source_size = max(first.shape[-2:])
        self.mean, self.std = default_normalisation(d.channels)
        self.label_smoothing = cfg.label_smoothing
        d.train.transform = train_transform(cfg.img_size, source_size, cfg.augment)
        d.val.transform = eval_transform(cfg.img_size)
        source = d.source
        if cfg.train_subset:
            train = stratified_subset(d.train, cfg.train_subset)
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
        logits = model(images)
        return F.cross_entropy(at_least_fp32(logits), targets, label_smoothing=self.label_smoothing), {}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model, loader, *, device, precision, names, channels_last=False) -> dict[str, Any]:
        from cnnkit.engine.loop import to_device

        n_cls = len(names)
        cm = torch.zeros(n_cls, n_cls, dtype=torch.long)
        hits = {1: 0, 5: 0}
        loss_sum, n = 0.0, 0
        for images, labels in loader:
            images = to_device(images, self, device, channels_last)
            labels = labels.to(device)
            with precision.autocast():
                logits = model(images)
            logits = at_least_fp32(logits)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            for k, v in topk_correct(logits, labels).items():
                hits[k] += v
            cm += confusion_matrix(logits.argmax(1), labels, n_cls).cpu()
            n += labels.numel()
        if dist.is_sharded(loader):  # torchrun: this process saw one shard; sum the counts of all
            cm, hits[1], hits[5], loss_sum, n = dist.sum_across(cm, hits[1], hits[5], loss_sum, n)
        per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
        return {"loss": loss_sum / max(1, n), "top1": hits[1] / max(1, n), "top5": hits[5] / max(1, n),
                "images": n, "per_class": dict(zip(names, per_class)), "confusion": cm.tolist()}

    def draw(self, metrics: dict[str, Any], out_dir: Path, *, names: list[str]) -> Path:
        from cnnkit.tasks.plots import plot_confusion

        return plot_confusion(metrics["confusion"], names, Path(out_dir) / "confusion_matrix.png",
                              title=f"top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}")

    # -- per-image scores (the run report's gallery) ----------------------------------------------
    @torch.no_grad()
    def score_images(self, model, images, targets, *, device, precision, channels_last=False) -> list[tuple[float, Any]]:
        """One validation batch -> per image (score, prediction); the score is the probability of the true class."""
        from cnnkit.engine.loop import to_device

        with precision.autocast():
            logits = model(to_device(images, self, device, channels_last))
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

    def predict_paths(self, trained, sources, *, out_dir, top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """Top-k classes of every image in `sources` (files or folders, recursively).

        Writes predictions.csv, predictions.json and predictions.png (an annotated grid of the first
        48) into out_dir, atomically; returns one dict per image.
        """
        import csv
        import io
        import json

        from cnnkit.data.images import decode_image
        from cnnkit.data.sources import collect_image_paths
        from cnnkit.engine.checkpoint import atomic_write_text
        from cnnkit.tasks.plots import plot_grid

        paths = collect_image_paths(sources)
        channels = int(trained.ckpt.get("preprocess", {}).get("channels", 3))
        tf = eval_transform(trained.img_size, float(trained.ckpt.get("preprocess", {}).get("crop_pct", 1.0)))
        names, rows, thumbs = trained.names, [], []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            imgs = [tf(_to_channels(decode_image(p), channels)) for p in chunk]
            x = torch.stack(imgs).to(trained.device)
            if trained.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs, idx = self.predict(trained.model, x, k=top_k, precision=trained.precision)
            for p, img, pr, ix in zip(chunk, imgs, probs.tolist(), idx.tolist()):
                top = [{"class": names[i], "index": i, "prob": round(q, 6)} for q, i in zip(pr, ix)]
                rows.append({"path": str(p), "top": top,
                             "summary": f"{p}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top[:3])})
                if len(thumbs) < 48:
                    thumbs.append((img, f"{names[ix[0]]} {pr[0]:.2f}"))
        out_dir = Path(out_dir)
        buf = io.StringIO()
        w = csv.writer(buf)
        k = len(rows[0]["top"]) if rows else top_k
        w.writerow(["path"] + [f"{c}{j + 1}" for j in range(k) for c in ("class", "prob")])
        for r in rows:
            w.writerow([r["path"]] + [v for t in r["top"] for v in (t["class"], t["prob"])])
        atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
        atomic_write_text(out_dir / "predictions.json",
                          json.dumps([{k: r[k] for k in ("path", "top")} for r in rows], indent=1))
        if thumbs:
            pics = [(t[0].permute(1, 2, 0).squeeze(-1).numpy()) for t in thumbs]
            plot_grid(pics, [t[1] for t in thumbs], out_dir / "predictions.png")
        return rows


def _to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Decoded RGB uint8 [3,H,W] -> the channel count the model was trained on (ITU-R 601 luma for grey)."""
    if channels == 3 or img.shape[0] == channels:
        return img
    if channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (img.float() * w).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {img.shape[0]} channels to {channels}")
