"""One pass over the training data, and one evaluation: plain functions, the same for every task."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from cnnkit.engine import distributed as dist
from cnnkit.errors import CnnkitError
from cnnkit.engine.device import Precision
from cnnkit.engine.finetune import train_mode
from cnnkit.engine.optim import ModelEMA


class DivergedError(CnnkitError):
    """The loss became NaN or infinite."""


def to_device(images: torch.Tensor, task, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = task.prepare(images.to(device, non_blocking=True))
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_one_epoch(model: nn.Module, task, loader, optimizer: torch.optim.Optimizer, scheduler,
                    precision: Precision, *, device: torch.device, channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None, ema: ModelEMA | None = None,
                    clip_grad: float = 0.0, max_steps: int = 0, epoch: int = 0, epochs: int = 1,
                    progress: bool = True, on_step=None) -> dict[str, Any]:
    """Train for one epoch (or until `max_steps` steps); returns mean loss, its parts and images/s.

    Under torchrun `model` is the DDP-wrapped model and `loader` reads this process's share of each
    global batch; the loss and its parts are averaged over the processes (one all-reduce a step), so
    every process logs, and checks for divergence, the loss of the global batch."""
    train_mode(model)
    totals: dict[str, float] = {}
    seen = steps = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
               disable=not progress, dynamic_ncols=True)
    for images, targets in bar:
        images = to_device(images, task, device, channels_last)
        targets = task.move_targets(targets, device)
        with precision.autocast():
            loss, parts = task.loss(model, images, targets)
        loss_value, *values = dist.average([loss.item(), *parts.values()], device)
        parts = dict(zip(parts, values))
        if not math.isfinite(loss_value):
            raise DivergedError(f"the loss became {loss_value} at epoch {epoch + 1}, step {steps + 1}",
                                fix="lower --lr, raise --warmup-epochs, or set --clip-grad 10")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(dist.unwrap(model))
        n = images.shape[0] * dist.world_size()
        if on_step is not None:
            on_step(epoch, steps, loss_value)
        seen += n
        steps += 1
        for k, v in {"loss": loss_value, **parts}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        if progress:
            rate = seen / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}", img_s=f"{rate:.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        if max_steps and steps >= max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    out = {f"train_{k}": v / max(1, seen) for k, v in totals.items()}
    out.update(images_per_s=seen / max(1e-9, elapsed), train_time_s=elapsed, steps=steps, images=seen)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, task, loader, precision: Precision, *, device: torch.device,
             channels_last: bool = False, names: list[str]) -> dict[str, Any]:
    """Put the model in eval mode and let the task compute its metrics."""
    model.eval()
    return task.evaluate(model, loader, device=device, precision=precision, names=names,
                         channels_last=channels_last)
