"""One pass over the training data, and one evaluation: plain functions, the same for every task."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
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
    """The loss (or the weights) became NaN or infinite."""


class StopRequest:
    """SIGINT / SIGTERM during training: the handler only sets a flag, which the training loop reads
    after each step; `fit` then saves a checkpoint of that step and raises `TrainingInterrupted`.
    A second SIGINT stops at once (KeyboardInterrupt; last.pt then holds the last finished epoch)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals while the block runs (main thread only), then restore the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving `checkpoint`; the CLI exits 128 + signal
    (130 for SIGINT, 143 for SIGTERM) after one line naming the checkpoint and the --resume command."""

    def __init__(self, signum: int, checkpoint, task: str, epoch: int, step: int):
        self.signum, self.checkpoint, self.task, self.epoch, self.step = signum, checkpoint, task, epoch, step
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        super().__init__(f"stopped by {name} at {where}; checkpoint saved in {checkpoint}; "
                         f"continue with: cnnkit train {task} --resume {checkpoint}")


def to_device(images: torch.Tensor, task, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = task.prepare(images.to(device, non_blocking=True))
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_one_epoch(model: nn.Module, task, loader, optimizer: torch.optim.Optimizer, scheduler,
                    precision: Precision, *, device: torch.device, channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None, ema: ModelEMA | None = None,
                    clip_grad: float = 0.0, max_steps: int = 0, epoch: int = 0, epochs: int = 1,
                    progress: bool = True, on_step=None, stop: StopRequest | None = None,
                    skip_nonfinite: bool = False, start_step: int = 0, resume_rng: dict | None = None,
                    resume_totals: dict | None = None) -> dict[str, Any]:
    """Train for one epoch (or until `max_steps` steps); returns mean loss, its parts and images/s.

    Under torchrun `model` is the DDP-wrapped model and `loader` reads this process's share of each
    global batch; the loss and its parts are averaged over the processes (one all-reduce a step), so
    every process logs, and checks for divergence, the loss of the global batch.

    A NaN / inf loss raises `DivergedError`, or with `skip_nonfinite` skips the step (no backward, no
    optimizer, scaler or EMA update; the scheduler still steps, so the schedule keeps its place in the
    data) and counts it in `skipped_steps`. When `stop` was signalled, the epoch ends after the current
    step with `interrupted_at` = steps done in it (the same step on every process: the flag travels in
    the loss all-reduce). `start_step` resumes an epoch: the loader's first batches (the epoch's
    deterministic order, with their augmentation drawn again) are read and dropped, then `resume_rng`
    is restored and `resume_totals` continue the epoch's sums."""
    train_mode(model)
    totals: dict[str, float] = dict((resume_totals or {}).get("totals", {}))
    seen = seen_before = int((resume_totals or {}).get("seen", 0))
    steps = skipped = 0
    step = start_step  # index of the next step within the epoch
    start = time.perf_counter()
    batches = iter(loader)  # the DataLoader draws its workers' base seed here, as the interrupted epoch did
    for _ in range(start_step):
        next(batches)
    if start_step and resume_rng is not None:
        from cnnkit.engine.checkpoint import set_rng_state

        set_rng_state(resume_rng)
    bar = tqdm(batches, total=len(loader), initial=start_step, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
               leave=False, disable=not progress, dynamic_ncols=True)
    interrupted_at = None
    for images, targets in bar:
        images = to_device(images, task, device, channels_last)
        targets = task.move_targets(targets, device)
        with precision.autocast():
            loss, parts = task.loss(model, images, targets)
        asked = float(bool(stop is not None and stop.signum))
        loss_value, *values, asked = dist.average([loss.item(), *parts.values(), asked], device)
        parts = dict(zip(parts, values))
        finite = math.isfinite(loss_value)
        if not finite and not skip_nonfinite:
            raise DivergedError(f"the loss became {loss_value} at epoch {epoch + 1}, step {step + 1}",
                                fix="lower --lr, raise --warmup-epochs, set --clip-grad 10, or skip such steps "
                                "with --skip-nonfinite; weights/last.pt still holds the last finished epoch")
        n = images.shape[0] * dist.world_size()
        if finite:
            _optimize(model, loss, optimizer, scaler, clip_grad)
            scheduler.step()
            if ema is not None:
                ema.update(dist.unwrap(model))
            seen += n
            for k, v in {"loss": loss_value, **parts}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
        else:  # --skip-nonfinite: nothing learnt from this batch
            scheduler.step()
            skipped += 1
        if on_step is not None:
            on_step(epoch, step, loss_value)
        steps += 1
        step += 1
        if progress and seen:
            rate = (seen - seen_before) / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}", img_s=f"{rate:.0f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        if max_steps and steps >= max_steps:
            break
        # one process alone reads its own flag at once; several stop at the step whose all-reduce saw one
        if (asked if dist.world_size() > 1 else stop is not None and stop.signum) and step < len(loader):
            interrupted_at = step
            break
    bar.close()
    elapsed = time.perf_counter() - start
    out = {f"train_{k}": v / max(1, seen) for k, v in totals.items()}
    out.setdefault("train_loss", float("nan"))  # every step of the epoch skipped
    out.update(images_per_s=(seen - seen_before) / max(1e-9, elapsed), train_time_s=elapsed, steps=steps, images=seen,
               skipped_steps=skipped, interrupted_at=interrupted_at, totals={"totals": totals, "seen": seen})
    return out


def _optimize(model: nn.Module, loss: torch.Tensor, optimizer, scaler, clip_grad: float) -> None:
    """Backward and one optimizer step (through the GradScaler, which skips steps with inf gradients)."""
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


@torch.no_grad()
def evaluate(model: nn.Module, task, loader, precision: Precision, *, device: torch.device,
             channels_last: bool = False, names: list[str]) -> dict[str, Any]:
    """Put the model in eval mode and let the task compute its metrics."""
    model.eval()
    return task.evaluate(model, loader, device=device, precision=precision, names=names,
                         channels_last=channels_last)
