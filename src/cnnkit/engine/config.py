"""The settings of a training run; written to `runs/<task>/<name>/config.yaml`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    task: str = "classify"
    model: str = "vgg11_bn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # initial weights: "imagenet", a torchvision weight name, or a file
    download: bool = False  # allow downloading torchvision weights
    input_norm: str = "weights"  # "weights": (x - mean) / std of the pretrained weights; "unit": x / 255, in [0, 1]
    freeze_backbone: bool = False
    unfreeze_at: int = 0  # 1-based epoch at which a frozen backbone trains again (0 = never)
    compile: bool = False  # torch.compile the training model (inductor)
    freeze_early: int = 0  # keep the backbone layers at stride <= this frozen all run (0 = none)
    backbone_lr_scale: float = 1.0
    data: str = "fashion-mnist"
    epochs: int = 10  # with `time`: the most epochs (0 = as many as the budget allows)
    time: float = 0.0  # minutes: train to this time budget (0 = no budget; cnnkit.engine.budget)
    batch_size: int = 64  # global: split evenly over the processes under torchrun
    img_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    clip_grad: float = 0.0
    skip_nonfinite: bool = False  # a NaN / inf loss skips its step (counted in metrics.csv) instead of stopping the run
    augment: bool = True
    precision: str = "auto"
    channels_last: str = "auto"
    device: str = "auto"
    workers: int = -1  # -1 = chosen automatically
    seed: int = 0
    project: str = "runs"
    name: str = "exp"
    exist_ok: bool = False
    on_bad_image: str = "error"
    on_bad_label: str = "error"
    dice_weight: float = 0.0  # segment: weight of the soft Dice loss added to the cross-entropy
    copy_paste: float = 0.0  # segment: chance that a training image gets another image's labelled pixels pasted on
    class_weights: str = ""  # segment: "", "median-frequency" or one number per class, comma-separated
    train_subset: int = 0  # train on a stratified subset of this many images (0 = all)
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit); for tests and benchmarks
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over the global batch (nn.SyncBatchNorm)
    plots: bool = True
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_task(cls, task: str, **changes) -> "TrainConfig":
        """The settings `cnnkit train <task>` uses by default (model, its options, recipe), with `changes`
        applied; a `model` given in `changes` drops the default model's options."""
        from cnnkit.tasks.defaults import TASK_DEFAULTS

        if task not in TASK_DEFAULTS:
            from cnnkit.errors import UsageError

            raise UsageError(f"unknown task {task!r}", fix=f"use one of {', '.join(TASK_DEFAULTS)}")
        d = TASK_DEFAULTS[task]
        kwargs = {} if "model" in changes else dict(d["model_kwargs"])
        kwargs.update(changes.pop("model_kwargs", {}))
        values = {"task": task, "model": d["model"], **d["config"], **changes, "model_kwargs": kwargs}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            from cnnkit.errors import UsageError

            raise UsageError(f"unknown TrainConfig field(s) {', '.join(unknown)}",
                             fix=f"use fields of cnnkit.engine.config.TrainConfig")
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
