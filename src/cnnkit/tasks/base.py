"""The small interface between the training engine and a task.

The engine (cnnkit.engine) knows nothing of labels, boxes or masks: it asks the task for data, a
model, the loss of a batch and the metrics of an evaluation. A task is the only place that knows
what a target means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cnnkit.errors import UsageError


@dataclass
class TaskData:
    """What a task hands the engine: datasets with their transforms set, and what a checkpoint keeps."""

    train: Dataset
    val: Dataset
    names: list[str]
    collate_fn: Callable | None = None
    in_memory: bool = False
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # stored in checkpoints (e.g. preprocessing)
    skipped: list = field(default_factory=list)


class Task:
    """Base class: subclasses set `name`, `fitness` (the metric best.pt maximises) and implement these."""

    name: str = ""
    fitness: str = ""
    metric_names: tuple[str, ...] = ()

    def build_data(self, cfg) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and loss of one batch; returns (loss, logged parts)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, *, device: torch.device, precision, names: list[str]) -> dict[str, Any]:
        """Metrics on a loader; the dict holds `self.fitness`, plus anything the task wants to draw."""
        raise NotImplementedError

    # input normalisation: (x / 255 - mean) / std per channel; kept in checkpoints as meta["mean"], ["std"]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def configure(self, meta: dict[str, Any]) -> None:
        """Set what prediction needs (preprocessing, geometry) from a checkpoint's `preprocess` entry."""
        self.configure_normalisation(meta)

    def configure_normalisation(self, meta: dict[str, Any]) -> None:
        if "mean" in meta and "std" in meta:
            self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])

    def adopt_weights_normalisation(self, model: nn.Module, cfg, data: TaskData) -> None:
        """Pretrained weights bring the input normalisation they were trained with (model.cnnkit_preprocess,
        e.g. EfficientNet-Lite0's (x - 0.5) / 0.5): store it in data.meta and use it. `cfg.input_norm == "unit"`
        keeps x / 255 (the task's own meta) instead."""
        how = getattr(cfg, "input_norm", "weights")
        if how not in ("weights", "unit"):
            raise UsageError(f"input_norm must be 'weights' or 'unit', got {how!r}", fix="--input-norm weights")
        pre = getattr(model, "cnnkit_preprocess", None)
        if not (cfg.weights and pre) or how == "unit":
            return
        channels = int(data.meta.get("channels", len(pre["mean"])))
        mean, std = list(pre["mean"]), list(pre["std"])
        if channels != len(mean):  # grey input into a colour-trained net: the channel average
            mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
        data.meta.update(mean=mean, std=std)
        self.configure(data.meta)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch on the device -> the float tensor the model takes: (x / 255 - mean) / std."""
        return normalise(images, self.mean, self.std)

    def draw(self, metrics: dict[str, Any], out_dir, *, names: list[str]):
        """Pictures of a final evaluation (confusion matrix, PR curves ...) written into out_dir."""
        return None

    # what `cnnkit val --save-KIND` writes for this task: {KIND: what the files hold}
    saves: dict[str, str] = {}
    # set while such files are written: `evaluate` hands it (index in the validation set, prediction)
    # of every validation image, in order, as its metrics see them (one process only)
    on_prediction: Callable[[int, Any], None] | None = None

    def result_writer(self, kinds: tuple[str, ...], data: TaskData, out_dir) -> "ResultWriter":
        """A writer of the files `kinds` (keys of `saves`) for the validation set of `data`."""
        raise UsageError(f"the {self.name} task saves no predictions", fix="drop the --save-* flags")

    def move_targets(self, targets: Any, device: torch.device) -> Any:
        return targets.to(device, non_blocking=True) if isinstance(targets, torch.Tensor) else targets


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 / integer tensors (losses and metrics after autocast); float64 stays."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class ResultWriter:
    """Takes each validation prediction (`add`), then writes what is left to write (`close`)."""

    def add(self, index: int, prediction: Any) -> None:
        raise NotImplementedError

    def close(self) -> list[str]:
        """Finish; one line per thing written, saying what it is and where."""
        raise NotImplementedError


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float (torch's default dtype, float32 unless set otherwise), (x / 255 - mean) / std
    per channel."""
    x = images.to(torch.get_default_dtype()) / 255.0
    if all(m == 0.0 for m in mean) and all(v == 1.0 for v in std):
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def square_batches(trained, paths, batch_size: int, prepare):
    """Decode image files in chunks and resize each to the model's img_size square: yields (paths of
    the chunk, the decoded uint8 originals, the prepared float batch on the model's device)."""
    from torchvision.transforms import v2

    from cnnkit.data.images import decode_image

    size = trained.img_size
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        originals = [decode_image(p) for p in chunk]
        x = torch.stack([v2.functional.resize(im, [size, size], antialias=True) for im in originals])
        x = prepare(x.to(trained.device))
        if trained.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield chunk, originals, x
