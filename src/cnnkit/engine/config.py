"""The settings of a training run; written to `runs/<task>/<name>/config.yaml`."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cnnkit.errors import UsageError
from cnnkit.taskapi import task_class, task_names


@dataclass
class TrainConfig:
    task: str = ""  # a registered task (cnnkit.taskapi); "" = the first registered (classify)
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
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit); for tests and benchmarks
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over the global batch (nn.SyncBatchNorm)
    plots: bool = True
    progress: bool = True
    options: Any = None  # the task's own settings: its `Options` dataclass (a dict is converted)

    def __post_init__(self) -> None:
        self.task = self.task or task_names()[0]
        options_class = task_class(self.task).Options
        if self.options is None:
            self.options = options_class()
        elif isinstance(self.options, dict):
            self.options = options_class.from_dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        """config.yaml: the engine's fields and the task's options, one flat mapping."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "options"}
        d.update(self.options.to_dict())
        return d

    @classmethod
    def for_task(cls, task: str, **changes) -> "TrainConfig":
        """The settings `cnnkit train <task>` uses by default (the task's `defaults`: model, its options,
        recipe), with `changes` applied (engine fields and the task's options alike); a `model` given in
        `changes` drops the default model's options."""
        d = task_class(task).defaults
        kwargs = {} if "model" in changes else dict(d.get("model_kwargs", {}))
        kwargs.update(changes.pop("model_kwargs", {}))
        values = {"task": task, "model": d.get("model", ""), **d.get("config", {}), **changes, "model_kwargs": kwargs}
        return cls.from_dict(values, strict=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = False) -> "TrainConfig":
        """A config from a flat mapping (config.yaml, a checkpoint's "config"): the task's option names go
        to `options`; other unknown names are an error with `strict`, else left out (an earlier version's)."""
        task = d.get("task") or task_names()[0]
        options_class = task_class(task).Options
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        option_names = set(options_class.setting_names())
        unknown = sorted(set(d) - names - option_names - {"options"})
        if strict and unknown:
            raise UsageError(f"unknown setting(s) {', '.join(unknown)} for the {task} task",
                             fix=f"use fields of cnnkit.engine.config.TrainConfig or of {options_class.__name__}")
        options = d.get("options")
        if not isinstance(options, options_class):
            options = options_class.from_dict({**(options or {}), **{k: v for k, v in d.items() if k in option_names}})
        return cls(**{k: v for k, v in d.items() if k in names}, options=options)


def check_model_for_task(task: str, model: str) -> None:
    """A model of another task is a usage error naming the models this task trains (before any data is read)."""
    from cnnkit.models import get_entry, list_models

    kinds = task_class(task).kinds()
    entry = get_entry(model)
    if entry.task not in kinds:
        offered = [m for kind in kinds for m in list_models(kind)]
        raise UsageError(f"{entry.name} is a {entry.task} model; the {task} task trains: {', '.join(offered)}",
                         fix=f"choose one of these with --model, or train it with `cnnkit train {entry.task}`")
