"""What a task is: the interface the engine calls, the task's own options, and the registry of tasks.

A task (classify, detect, segment, or one of yours) is ONE class, a subclass of `Task`, registered with
`@register_task`. It declares in one place everything the rest of cnnkit asks of it:

    name, fitness, metric_names      what it is called, which metric best.pt maximises, what the log shows
    Options                           its own settings: a dataclass of `option(...)` fields, each a CLI flag
    defaults                          the model, model options and TrainConfig values `cnnkit train NAME` uses
    model_kinds                       which models of the model registry it trains (their `task` tag)
    build_data / build_model / loss   training
    eval_start / eval_step / summarise / draw      evaluation (the engine runs the loop)
    score_batch / draw_example        the report's gallery of best and worst validation images
    predict_inputs / predict_step / prediction_writer      prediction of image files (the engine runs the loop)
    check_data                        `cnnkit data check`
    export_module / export_outputs    what `cnnkit export` writes (e.g. YOLO with NMS in the graph)
    demo_minutes / demo_predict / demo_lines       its part of `make demo`

The engine, the CLI, the report and the demo enumerate the registry (`task_names`, `get_task`) and never
name a task. This module sits at the bottom of the package (it imports torch and cnnkit.errors only);
`cnnkit.tasks` imports it, never the other way round: the built-in tasks are loaded by name when the
registry is first read, and `CNNKIT_TASKS=my.module,other.module` loads tasks of your own the same way.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from cnnkit.errors import UsageError

BUILTIN_TASKS = "cnnkit.tasks"  # the package whose import registers the built-in tasks
PLUGINS_ENV = "CNNKIT_TASKS"  # comma-separated modules whose import registers more tasks


# ------------------------------------------------------------------------------- flag value types
def number(kind, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse type: an int / finite float within [low, high] (an open end excludes the bound);
    a value outside becomes argparse's one-line usage error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {' and '.join(x for x in (lo, hi) if x)}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, 1)
COUNT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)
FRACTION = number(float, 0, 1, high_open=True)
PROBABILITY = number(float, 0, 1)


# ------------------------------------------------------------------------------------ task options
def option(default, help: str, *, type=None, choices=None, metavar=None, model: bool = False, flag=None):
    """A field of a task's `Options` dataclass, with what its CLI flag needs (`--name-with-dashes`).

    `type`: an argparse type (bool fields become --flag / --no-flag); `model=True`: the value is a
    keyword of the model's constructor (it goes into `model_kwargs`, given only when set, default None)."""
    meta = {"help": help, "type": type, "choices": choices, "metavar": metavar, "model": model, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TaskOptions:
    """Base of a task's options (none). Subclass it as a dataclass of `option(...)` fields."""

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def setting_names(cls) -> list[str]:
        """The fields stored in the options (not model keywords)."""
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("model")]

    @classmethod
    def model_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("model")]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TaskOptions":
        names = cls.setting_names()
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.setting_names()}


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_dest(flag: str) -> str:
    """"--conf-threshold" -> "conf_threshold": the name a flag's value goes by."""
    return flag.lstrip("-").replace("-", "_")


# --------------------------------------------------------------------------------- the interface
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


@dataclass
class EvalState:
    """What an evaluation accumulates: `sums` are added over the processes under torchrun (numbers or
    tensors), `lists` are gathered in validation-set order; `extra` stays per process."""

    sums: dict[str, Any] = field(default_factory=dict)
    lists: dict[str, list] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def extend(self, key: str, items, limit: int | None = None) -> None:
        have = self.lists.setdefault(key, [])
        room = len(items) if limit is None else max(0, limit - len(have))
        have.extend(list(items)[:room])


class ResultWriter:
    """Takes each validation prediction (`add`), then writes what is left to write (`close`)."""

    def add(self, index: int, prediction: Any) -> None:
        raise NotImplementedError

    def close(self) -> list[str]:
        """Finish; one line per thing written, saying what it is and where."""
        raise NotImplementedError


class PredictionWriter:
    """Takes each predicted file (`add` -> its row: a dict with at least "path" and "summary"), then
    writes the files that cover them all (`close`)."""

    def add(self, path, original: torch.Tensor, prediction: Any) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        return None


class Task:
    """Base class of every task; see the module docstring for what a subclass declares."""

    name: ClassVar[str] = ""
    fitness: ClassVar[str] = ""
    metric_names: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    defaults: ClassVar[dict[str, Any]] = {}  # {"model": ..., "model_kwargs": {...}, "config": {TrainConfig field: value}}
    model_kinds: ClassVar[tuple[str, ...]] = ()  # the model registry's task tags it trains (empty: its own name)
    figure: ClassVar[tuple[str, str] | None] = None  # (file `draw` writes, caption) shown in the report
    score_meaning: ClassVar[str] = "the task's score"  # what `score_batch` scores, said in the report
    saves: ClassVar[dict[str, str]] = {}  # `cnnkit val --save-KIND`: {KIND: what the files hold}
    predict_flags: ClassVar[dict[str, dict]] = {}  # `cnnkit predict` flags of this task: {"--flag": argparse kwargs}
    demo_minutes: ClassVar[float] = 0.0  # its `make demo` time budget (0 = not in the demo)
    demo_quick_steps: ClassVar[int] = 0  # `cnnkit demo --quick`: steps of its one epoch (0 = the whole epoch)

    # input normalisation: (x / 255 - mean) / std per channel; kept in checkpoints as meta["mean"], ["std"]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        return cls.model_kinds or (cls.name,)

    # -- training -------------------------------------------------------------------------------
    def build_data(self, cfg) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and loss of one batch; returns (loss, logged parts)."""
        raise NotImplementedError

    def move_targets(self, targets: Any, device: torch.device) -> Any:
        return targets.to(device, non_blocking=True) if isinstance(targets, torch.Tensor) else targets

    # -- evaluation: the engine's loop calls these (cnnkit.engine.loop.evaluate) -----------------
    def eval_start(self, names: list[str], device: torch.device) -> EvalState:
        return EvalState()

    def eval_step(self, state: EvalState, outputs: Any, images: torch.Tensor, targets: Any) -> list | None:
        """Accumulate one batch: `outputs` = the model's (float32 or wider), `images` the uint8 batch on
        the CPU, `targets` on the device. Returns the batch's per-image predictions (what `cnnkit val
        --save-*` writes) or None."""
        raise NotImplementedError

    def summarise(self, state: EvalState, names: list[str]) -> dict[str, Any]:
        """Metrics from the (reduced) state; holds `self.fitness`, plus anything `draw` needs."""
        raise NotImplementedError

    def draw(self, metrics: dict[str, Any], out_dir, *, names: list[str]):
        """Pictures of a final evaluation (confusion matrix, PR curves ...) written into out_dir."""
        return None

    def result_writer(self, kinds: tuple[str, ...], data: TaskData, out_dir) -> ResultWriter:
        """A writer of the files `kinds` (keys of `saves`) for the validation set of `data`."""
        raise UsageError(f"the {self.name} task saves no predictions", fix="drop the --save-* flags")

    # -- the report's gallery --------------------------------------------------------------------
    def score_batch(self, outputs: Any, targets: Any) -> list[tuple[float, Any]]:
        """One validation batch's outputs -> per image (score, prediction), higher = better."""
        raise NotImplementedError

    def draw_example(self, image, target, prediction, score: float, names: list[str]) -> list[tuple[Any, str]]:
        """One image drawn for the gallery: [(HxW[x3] uint8 array, caption)]."""
        raise NotImplementedError

    # -- prediction of files: the engine's predictor calls these (cnnkit.engine.predictor) -------
    def predict_inputs(self, trained, paths) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Decode files -> (the decoded originals, the uint8 batch [N,C,H,W] the model takes); None (the
        default) = the engine's way: each file decoded and resized to the model's square input."""
        return None

    def predict_step(self, trained, outputs: Any, options: dict[str, Any]) -> list:
        """A batch's model outputs -> one prediction per image."""
        raise NotImplementedError

    def prediction_writer(self, trained, paths, out_dir, options: dict[str, Any], log) -> PredictionWriter:
        raise NotImplementedError

    # -- a checkpoint's preprocessing ------------------------------------------------------------
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

    def from_pretrained(self, model: nn.Module) -> tuple[dict[str, Any], list[str]]:
        """`cnnkit predict --model NAME --weights W`: (preprocess, class names) of a pretrained model."""
        raise UsageError(f"the {self.name} task cannot predict with bare pretrained weights",
                         fix="predict with a checkpoint `cnnkit train` wrote")

    # -- data check, export, demo ----------------------------------------------------------------
    def check_data(self, spec, *, decode: bool = True):
        """`cnnkit data check DATA --task NAME`: a cnnkit.data.check.CheckReport."""
        raise UsageError(f"the {self.name} task has no data check", fix="train with the data to see its errors")

    def export_module(self, model: nn.Module, meta: dict[str, Any], nms: dict[str, Any] | None) -> nn.Module:
        """The module `cnnkit export` writes; `nms` = the --with-nms settings or None. May add to `meta`."""
        if nms is not None:
            raise UsageError(f"--with-nms does not apply to a {self.name} checkpoint", fix="leave --with-nms out")
        return model

    def export_outputs(self, with_nms: bool) -> list[str]:
        return ["outputs of the model"]

    def for_exported(self, metadata: dict[str, Any]) -> "Task":
        """The task that reads the outputs of an exported file with this metadata (self by default)."""
        return self

    def demo_predict(self, trained, run_dir, cfg) -> None:
        """`make demo`: predict a few files with the trained model into run_dir/predict."""

    def demo_lines(self, cfg, metrics: dict[str, Any], run_dir, epochs: int, minutes: float) -> list[str]:
        return [f"demo: {self.name} {cfg.model} trained {epochs} epochs in {minutes:.1f} min: "
                f"{self.fitness} {metrics.get(self.fitness, float('nan')):.4f}"]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 / integer tensors (losses and metrics after autocast); float64 stays."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float (torch's default dtype, float32 unless set otherwise), (x / 255 - mean) / std
    per channel."""
    x = images.to(torch.get_default_dtype()) / 255.0
    if all(m == 0.0 for m in mean) and all(v == 1.0 for v in std):
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------- registry
_TASKS: dict[str, type[Task]] = {}
_loaded = False


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` a task of cnnkit under `cls.name` (the CLI gets `cnnkit train NAME`)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not cls.name:
        raise TypeError("register_task takes a subclass of cnnkit.taskapi.Task with a `name`")
    if not dataclasses.is_dataclass(cls.Options) or not issubclass(cls.Options, TaskOptions):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass subclass of TaskOptions")
    old = _TASKS.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"task {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTIN_TASKS)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"{PLUGINS_ENV}: cannot import {module!r} ({exc})",
                             fix=f"put the module on PYTHONPATH or remove it from {PLUGINS_ENV}") from None


def task_names() -> list[str]:
    """Every registered task, the built-in ones first, in registration order."""
    _load()
    return list(_TASKS)


def task_class(name: str) -> type[Task]:
    _load()
    if name not in _TASKS:
        raise UsageError(f"unknown task {name!r}", fix=f"choose one of {', '.join(_TASKS)}")
    return _TASKS[name]


def get_task(name: str) -> Task:
    """A fresh instance of the registered task `name`."""
    return task_class(name)()


def all_defaults() -> dict[str, dict[str, Any]]:
    """{task: its `defaults`} of every registered task (what `TASK_DEFAULTS` names)."""
    return {name: task_class(name).defaults for name in task_names()}
