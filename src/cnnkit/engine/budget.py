"""Training to a time budget (`--time MINUTES`, ultralytics' `time=`).

The run measures how long its own steps take over the first steps of its first epoch, sets the number
of epochs so that training, each epoch's evaluation and the final pictures and report end inside the
budget, and refits the learning-rate schedule (warm-up, cosine or step) to those epochs. After every
epoch the plan is checked against the measured epoch time (training + evaluation) and cut when the
budget would be overrun; in its first half it may grow, when the first estimate was low.
A resumed run keeps what was left: the time already used travels in the checkpoint. With `--epochs`
as well, whichever ends first; `epochs=0` with a budget means as many epochs as fit.

Estimates before the first evaluation: an evaluation costs `EVAL_COST` of a training pass over the
same number of images (a forward pass is about a third of forward + backward, plus post-processing),
and the final pictures and report (which evaluates best.pt once more) about one evaluation and
`FINAL_FIXED_S` seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from cnnkit.errors import UsageError

EVAL_COST = 0.5
FINAL_FIXED_S = 4.0
PLAN_AFTER_STEPS = 10
GROW_MARGIN = 1.10  # the plan grows only if the extra epochs fit at a 10% slower pace (epochs vary ~10% here)


def check_minutes(minutes) -> float:
    """A valid budget in minutes (> 0), or a UsageError."""
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        raise UsageError(f"--time {minutes!r} is not a number of minutes", fix="give minutes, e.g. --time 10") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--time {minutes!r}: a time budget must be more than 0 minutes",
                         fix="give minutes, e.g. --time 10 (or leave --time out and set --epochs)")
    return value


@dataclass
class Budget:
    """The clock of a run trained to a time budget; all times in seconds."""

    seconds: float
    used_before: float = 0.0  # by earlier processes of this run (from the checkpoint)
    max_epochs: int = 0  # 0 = as many as fit
    start: float = field(default_factory=lambda: time.perf_counter())
    epoch_times: list[float] = field(default_factory=list)  # training + evaluation, epochs of this process
    eval_times: list[float] = field(default_factory=list)

    def used(self) -> float:
        return self.used_before + time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.used()

    def _cap(self, epochs: int) -> int:
        return min(epochs, self.max_epochs) if self.max_epochs else epochs

    def final_reserve(self, eval_s: float) -> float:
        """What follows the last epoch: the pictures and the report (which evaluates best.pt again)."""
        return eval_s + FINAL_FIXED_S

    def plan_from_steps(self, *, epoch: int, step_s: float, steps_left: int, iters: int, train_images: int,
                        val_images: int) -> tuple[int, dict]:
        """Epochs in all, from the measured time of a training step, during epoch `epoch` (0-based)."""
        epoch_train = step_s * iters
        eval_s = EVAL_COST * epoch_train * val_images / max(1, train_images)
        this_epoch = step_s * steps_left + eval_s
        spare = self.remaining() - this_epoch - self.final_reserve(eval_s)
        more = math.floor(spare / (epoch_train + eval_s)) if spare > 0 else -1
        if more < 0 and self.used_before > 0:  # a resumed run whose budget is nearly spent: end with this epoch
            more = 0
        if more < 0:
            smallest = (self.used() + this_epoch + self.final_reserve(eval_s)) / 60
            raise UsageError(f"a time budget of {self.seconds / 60:g} min is too small for one epoch plus evaluation "
                             f"(about {(epoch_train + eval_s) / 60:.2f} min an epoch here)",
                             fix=f"give at least --time {math.ceil(smallest * 10) / 10:g}, or fewer images / a smaller model")
        info = {"step_s": step_s, "epoch_s": epoch_train + eval_s, "eval_s": eval_s}
        return self._cap(epoch + 1 + more), info

    def end_epoch(self, train_s: float, eval_s: float) -> None:
        self.epoch_times.append(train_s + eval_s)
        self.eval_times.append(eval_s)

    def replan(self, *, epochs_done: int, planned: int) -> int:
        """After an epoch: the epochs in all that still fit the budget, given the measured epoch time
        (the slower of the mean and the last epoch). The plan shrinks whenever it would overrun; it grows
        only in its first half, and only when the extra epochs fit at a `GROW_MARGIN` slower pace (a
        first estimate taken while the machine was busy)."""
        epoch_s = max(sum(self.epoch_times) / len(self.epoch_times), self.epoch_times[-1])  # the slower pace
        eval_s = max(self.eval_times)
        spare = self.remaining() - self.final_reserve(eval_s)
        fit = epochs_done + max(0, math.floor(spare / epoch_s))
        fit = self._cap(max(fit, epochs_done))
        if fit < planned:
            return fit
        grown = epochs_done + max(0, math.floor(spare / (epoch_s * GROW_MARGIN)))  # grow only with room to spare
        if self._cap(grown) > planned and epochs_done <= planned / 2:  # late growth would raise the lr again
            return self._cap(grown)
        return planned


class BudgetPlan:
    """Keeps a run's epochs and learning-rate schedule fitted to its `Budget` (used by `fit`).

    `on_step` wraps the step callback of an epoch to time the first `PLAN_AFTER_STEPS` steps of this
    process and plan from them; `end_epoch` replans from the measured epoch; `state` goes into the
    checkpoint (time used, epochs planned). Under torchrun rank 0's plan is broadcast."""

    def __init__(self, budget: Budget, scheduler, cfg, *, iters: int, train_images: int, val_images: int,
                 planned: int = 0, log=print):
        self.budget, self.scheduler, self.cfg, self.log = budget, scheduler, cfg, log
        self.iters, self.train_images, self.val_images = iters, train_images, val_images
        self.epochs = planned  # 0 until planned
        self.times: list[float] = []

    def on_step(self, inner, epoch: int):
        if self.times is None:  # planned already in this process
            return inner
        self.times = []  # steps of one epoch only: an evaluation between two steps is no step time

        def step(e, s, loss):
            if inner is not None:
                inner(e, s, loss)
            if self.times is None:
                return
            self.times.append(time.perf_counter())
            if len(self.times) == PLAN_AFTER_STEPS:
                step_s = (self.times[-1] - self.times[0]) / (len(self.times) - 1)  # the first step is a warm-up
                self.plan(epoch, step_s, self.iters - (s + 1))
        return step

    def plan(self, epoch: int, step_s: float, steps_left: int) -> None:
        from cnnkit.engine import distributed as dist

        self.times = None
        planned, info = None, None
        if dist.is_main():
            planned, info = self.budget.plan_from_steps(epoch=epoch, step_s=step_s, steps_left=steps_left,
                                                        iters=self.iters, train_images=self.train_images,
                                                        val_images=self.val_images)
        planned, info = dist.broadcast_object((planned, info))
        self._set(planned)
        self.log(f"time budget {self.budget.seconds / 60:g} min: {planned} epochs "
                 f"({info['epoch_s']:.1f} s an epoch with evaluation, measured {info['step_s'] * 1000:.0f} ms a step; "
                 f"{self.budget.remaining() / 60:.1f} min left)")

    def end_epoch(self, epoch: int, train_s: float, eval_s: float, steps: int) -> None:
        """After epoch `epoch` (0-based) of `steps` steps (fewer than an epoch's when it was resumed midway)."""
        from cnnkit.engine import distributed as dist

        self.budget.end_epoch(train_s * self.iters / max(1, steps), eval_s)
        if not self.epochs:
            return
        new = self.budget.replan(epochs_done=epoch + 1, planned=self.epochs) if dist.is_main() else None
        new = dist.broadcast_object(new)
        if new != self.epochs:
            self.log(f"time budget: {new} epochs instead of {self.epochs} "
                     f"({self.budget.epoch_times[-1]:.1f} s measured for epoch {epoch + 1}, "
                     f"{self.budget.remaining() / 60:.1f} min left)")
            self._set(new)

    def _set(self, epochs: int) -> None:
        from cnnkit.engine.optim import default_steps

        self.epochs = epochs
        schedule = self.scheduler.lr_lambdas[0]
        schedule.refit(epochs * self.iters, None if self.cfg.steps else default_steps(epochs))

    def state(self) -> dict:
        return {"time_used_s": self.budget.used(), "planned_epochs": self.epochs}
