"""Optimizer, learning-rate schedule and weight EMA.

SGD with momentum 0.9 and weight decay 5e-4 is the default, as in AlexNet (Krizhevsky et al. 2012),
VGG (Simonyan & Zisserman 2015) and YOLO (Redmon et al. 2016); AdamW (Loshchilov & Hutter 2019) is
the alternative. Weight decay is not applied to biases and normalisation parameters.

The schedule is per iteration: a linear warm-up from `warmup_factor * lr` to `lr`, then either
cosine annealing to `min_lr_ratio * lr` or a step decay by `gamma` at the given epochs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from cnnkit.errors import UsageError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def parameter_groups(model: nn.Module, weight_decay: float, lr: float,
                     backbone: Iterable[nn.Parameter] = (), backbone_lr_scale: float = 1.0) -> list[dict]:
    """Split parameters into decay / no-decay groups, optionally with a scaled backbone rate."""
    backbone_ids = {id(p) for p in backbone}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and id(p) not in backbone_ids:
            continue
        no_decay = p.ndim <= 1  # biases, BatchNorm / LayerNorm weights
        groups.setdefault((id(p) in backbone_ids, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        scale = backbone_lr_scale if is_backbone else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr": lr * scale, "lr_scale": scale, "backbone": is_backbone})
    return out


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW; the fused multi-tensor kernel where torch has one for the
    device (several times faster than the per-tensor loop on a CPU), else the foreach one."""
    name = name.lower()
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}", fix=f"choose one of {', '.join(OPTIMIZERS)}")
    for impl in ({"fused": True}, {"foreach": True}, {}):
        try:
            if name == "sgd":
                return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **impl)
            return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **impl)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise AssertionError("unreachable")


@dataclass
class ScheduleShape:
    """The shape of the learning-rate schedule around its length: warm-up start, cosine floor, step decays."""

    warmup_factor: float = 0.1
    min_lr_ratio: float = 0.01
    steps: Sequence[int] = ()
    gamma: float = 0.1


def lr_factor(it: int, *, total_iters: int, warmup_iters: int, schedule: str, iters_per_epoch: int,
              **shape) -> float:
    """Multiplier of the base learning rate at iteration `it` (0-based); `shape`: the fields of `ScheduleShape`."""
    sh = ScheduleShape(**shape)
    if it < warmup_iters:
        return sh.warmup_factor + (1.0 - sh.warmup_factor) * it / max(1, warmup_iters)
    if schedule == "cosine":
        t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
        return sh.min_lr_ratio + (1 - sh.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        epoch = it // max(1, iters_per_epoch)
        return sh.gamma ** sum(epoch >= s for s in sh.steps)
    if schedule == "constant":
        return 1.0
    raise UsageError(f"unknown schedule {schedule!r}", fix=f"choose one of {', '.join(SCHEDULES)}")


class Schedule:
    """`lr_factor` with its settings as plain attributes: LambdaLR saves and restores them with its
    state_dict, so a schedule fitted to a time budget (`refit`) resumes as it was."""

    def __init__(self, **kwargs):
        lr_factor(0, **kwargs)  # validates the schedule name before training starts
        self.__dict__.update(kwargs)
        self.steps = list(self.__dict__.get("steps", ()))

    def __call__(self, it: int) -> float:
        return lr_factor(it, **self.__dict__)

    def refit(self, total_iters: int, steps: Sequence[int] | None = None) -> None:
        """Stretch or shrink the schedule to end at `total_iters` (the warm-up keeps its length)."""
        self.total_iters = int(total_iters)
        if steps is not None:
            self.steps = list(steps)


def default_steps(epochs: int) -> list[int]:
    """The step schedule's decay epochs when none are given: at 55% and 80% of training."""
    return [max(1, round(0.55 * epochs)), max(1, round(0.8 * epochs))]


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration, driven by a `Schedule`; `kwargs` are those of `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(**kwargs))


class ModelEMA:
    """Exponential moving average of weights: ema = d * ema + (1 - d) * w, with the decay ramped
    up as d = decay * (1 - exp(-updates / ramp)) so early averages are not dominated by the initial
    weights. The ramp defaults to a tenth of the averaging window 1 / (1 - decay)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, ramp: float | None = None):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.ramp = ramp if ramp is not None else 0.1 / (1.0 - decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        msd = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
