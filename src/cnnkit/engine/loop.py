"""One pass over the training data, and one evaluation: plain functions, the same for every task."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from cnnkit.engine import distributed as dist
from cnnkit.errors import CnnkitError
from cnnkit.engine.device import Precision, RunSettings
from cnnkit.engine.finetune import train_mode
from cnnkit.engine.optim import ModelEMA
from cnnkit.taskapi import at_least_fp32


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


@dataclass
class Optimisation:
    """What changes the weights in a training step."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEMA | None = None
    clip_grad: float = 0.0
    skip_nonfinite: bool = False  # a NaN / inf loss skips its step instead of raising DivergedError


@dataclass
class EpochPlan:
    """Which epoch this is and how it runs: progress bar, step budget, signals, and where a resumed epoch starts."""

    epoch: int = 0
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps (0 = the whole epoch)
    progress: bool = True
    on_step: Callable | None = None  # on_step(epoch, step, loss) after every step
    stop: StopRequest | None = None
    start_step: int = 0  # a resumed epoch: steps already done
    resume_rng: dict | None = None
    resume_totals: dict | None = None


def train_one_epoch(model: nn.Module, task, loader, opt: Optimisation, run: RunSettings,
                    plan: EpochPlan | None = None) -> dict[str, Any]:
    """Train for one epoch (or until `plan.max_steps` steps); returns mean loss, its parts and images/s.

    Under torchrun `model` is the DDP-wrapped model and `loader` reads this process's share of each
    global batch; the loss and its parts are averaged over the processes (one all-reduce a step), so
    every process logs, and checks for divergence, the loss of the global batch.

    A NaN / inf loss raises `DivergedError`, or with `opt.skip_nonfinite` skips the step (no backward, no
    optimizer, scaler or EMA update; the scheduler still steps, so the schedule keeps its place in the
    data) and counts it in `skipped_steps`. When `plan.stop` was signalled, the epoch ends after the current
    step with `interrupted_at` = steps done in it (the same step on every process: the flag travels in
    the loss all-reduce). `plan.start_step` resumes an epoch: the loader's first batches (the epoch's
    deterministic order, with their augmentation drawn again) are read and dropped, then `resume_rng`
    is restored and `resume_totals` continue the epoch's sums."""
    plan = plan or EpochPlan()
    train_mode(model)
    sums = _Sums(plan.resume_totals)
    step = plan.start_step  # index of the next step within the epoch
    start = time.perf_counter()
    batches = iter(loader)  # the DataLoader draws its workers' base seed here, as the interrupted epoch did
    for _ in range(plan.start_step):
        next(batches)
    if plan.start_step and plan.resume_rng is not None:
        from cnnkit.engine.checkpoint import set_rng_state

        set_rng_state(plan.resume_rng)
    bar = tqdm(batches, total=len(loader), initial=plan.start_step, desc=f"epoch {plan.epoch + 1}/{plan.epochs}",
               unit="batch", leave=False, disable=not plan.progress, dynamic_ncols=True)
    interrupted_at = None
    for images, targets in bar:
        asked = _train_step(model, task, (images, targets), opt, run, plan, step, sums)
        step += 1
        if plan.progress and sums.seen:
            rate = (sums.seen - sums.seen_before) / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(loss=f"{sums.totals['loss'] / sums.seen:.4f}", img_s=f"{rate:.0f}",
                            lr=f"{opt.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        if plan.max_steps and sums.steps >= plan.max_steps:
            break
        # one process alone reads its own flag at once; several stop at the step whose all-reduce saw one
        if asked and step < len(loader):
            interrupted_at = step
            break
    bar.close()
    return sums.result(time.perf_counter() - start, interrupted_at)


class _Sums:
    """The running sums of an epoch (continued from a resumed epoch's `totals`)."""

    def __init__(self, resume_totals: dict | None):
        self.totals: dict[str, float] = dict((resume_totals or {}).get("totals", {}))
        self.seen = self.seen_before = int((resume_totals or {}).get("seen", 0))
        self.steps = self.skipped = 0

    def add(self, n: int, values: dict[str, float]) -> None:
        self.seen += n
        for k, v in values.items():
            self.totals[k] = self.totals.get(k, 0.0) + float(v) * n

    def result(self, elapsed: float, interrupted_at) -> dict[str, Any]:
        out = {f"train_{k}": v / max(1, self.seen) for k, v in self.totals.items()}
        out.setdefault("train_loss", float("nan"))  # every step of the epoch skipped
        out.update(images_per_s=(self.seen - self.seen_before) / max(1e-9, elapsed), train_time_s=elapsed,
                   steps=self.steps, images=self.seen, skipped_steps=self.skipped, interrupted_at=interrupted_at,
                   totals={"totals": self.totals, "seen": self.seen})
        return out


def _train_step(model, task, batch, opt: Optimisation, run: RunSettings, plan: EpochPlan, step: int,
                sums: _Sums) -> bool:
    """One optimizer step on `batch` = (images, targets), or a skipped one; returns whether a stop was asked
    for (by any process)."""
    images, targets = batch
    images = run.inputs(images, task)
    targets = task.move_targets(targets, run.device)
    with run.autocast():
        loss, parts = task.loss(model, images, targets)
    stop = plan.stop
    asked = float(bool(stop is not None and stop.signum))
    loss_value, *values, asked = dist.average([loss.item(), *parts.values(), asked], run.device)
    parts = dict(zip(parts, values))
    finite = math.isfinite(loss_value)
    if not finite and not opt.skip_nonfinite:
        raise DivergedError(f"the loss became {loss_value} at epoch {plan.epoch + 1}, step {step + 1}",
                            fix="lower --lr, raise --warmup-epochs, set --clip-grad 10, or skip such steps "
                            "with --skip-nonfinite; weights/last.pt still holds the last finished epoch")
    if finite:
        _optimize(model, loss, opt.optimizer, opt.scaler, opt.clip_grad)
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update(dist.unwrap(model))
        sums.add(images.shape[0] * dist.world_size(), {"loss": loss_value, **parts})
    else:  # --skip-nonfinite: nothing learnt from this batch
        opt.scheduler.step()
        sums.skipped += 1
    if plan.on_step is not None:
        plan.on_step(plan.epoch, step, loss_value)
    sums.steps += 1
    return bool(asked) if dist.world_size() > 1 else bool(stop is not None and stop.signum)


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


def outputs_of(model: nn.Module, x: torch.Tensor, run: RunSettings):
    """The model's outputs under the run's autocast, cast to float32 (or wider) for metrics."""
    with run.autocast():
        out = model(x)
    if isinstance(out, (tuple, list)):
        return type(out)(at_least_fp32(o) if isinstance(o, torch.Tensor) else o for o in out)
    return at_least_fp32(out)


@torch.no_grad()
def evaluate(model: nn.Module, task, loader, run: RunSettings, *, names: list[str],
             on_prediction: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """The one evaluation loop of every task: eval mode, device, layout, autocast, the task's
    `eval_step` per batch, under torchrun the sums and lists of every process, then `summarise`.
    `on_prediction(index, prediction)` gets every validation image's prediction in order (one process)."""
    model.eval()
    state = task.eval_start(names, run.device)
    index = 0
    for images, targets in loader:
        outputs = outputs_of(model, run.inputs(images, task), run)
        preds = task.eval_step(state, outputs, images, task.move_targets(targets, run.device))
        if on_prediction is not None and preds is not None:
            for p in preds:
                on_prediction(index, p)
                index += 1
    if dist.is_sharded(loader):  # torchrun: this process saw one shard; add up and gather every process's
        keys = list(state.sums)
        state.sums = dict(zip(keys, dist.sum_across(*(state.sums[k] for k in keys))))
        state.lists = {k: dist.gather_ordered(v) for k, v in state.lists.items()}
    return task.summarise(state, names)
