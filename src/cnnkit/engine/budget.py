"""Training to a time budget (`--time MINUTES`, ultralytics' `time=`).

The run measures how long its own steps take over the first steps of its first epoch, sets the number
of epochs so that training, each epoch's evaluation and the final pictures and report end inside the
budget, and refits the learning-rate schedule (warm-up, cosine or step) to those epochs. The plan is
counted in steps: time short of another whole epoch goes to a last, partial epoch (at least
`MIN_TAIL` of an epoch, with its own evaluation), so the budget is used, not rounded down to an epoch.
After every epoch the plan is checked against the measured epoch time (training + evaluation): cut
when the budget would be overrun, grown by at least `MIN_TAIL` of an epoch when the extra steps fit at
a `GROW_MARGIN` slower pace (a first estimate taken while the machine was busy, or early epochs slowed
by other work).
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
MIN_TAIL = 0.25  # a last, partial epoch trains at least a quarter of an epoch (it costs a whole evaluation)
SHRINK_SLACK = 0.05  # an overrun of under 5% of an epoch's steps is no reason to cut the plan (epochs vary ~10%)


def epochs_in(steps: int, iters: int) -> int:
    """Epochs that `steps` training steps take, the last one perhaps partial."""
    return -(-steps // iters)


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

    def _cap(self, steps: int, iters: int) -> int:
        return min(steps, self.max_epochs * iters) if self.max_epochs else steps

    @staticmethod
    def steps_in(spare: float, epoch_s: float, eval_s: float, iters: int) -> int:
        """Training steps that fit into `spare` seconds: whole epochs (`epoch_s` each, evaluation included),
        then a partial epoch of at least `MIN_TAIL` of one in what is left (after its own evaluation)."""
        if spare <= 0:
            return 0
        full = math.floor(spare / epoch_s)
        rest = spare - full * epoch_s - eval_s
        step_s = max(epoch_s - eval_s, 1e-9) / iters
        tail = min(iters - 1, math.floor(rest / step_s)) if rest > 0 else 0
        return full * iters + (tail if tail >= MIN_TAIL * iters else 0)

    def final_reserve(self, eval_s: float) -> float:
        """What follows the last epoch: the pictures and the report (which evaluates best.pt again)."""
        return eval_s + FINAL_FIXED_S

    def plan_from_steps(self, *, epoch: int, step_s: float, steps_left: int, iters: int, train_images: int,
                        val_images: int) -> tuple[int, dict]:
        """Training steps in all, from the measured time of a training step, during epoch `epoch` (0-based)."""
        epoch_train = step_s * iters
        eval_s = EVAL_COST * epoch_train * val_images / max(1, train_images)
        this_epoch = step_s * steps_left + eval_s
        spare = self.remaining() - this_epoch - self.final_reserve(eval_s)
        if spare < 0 and not self.used_before > 0:  # (a resumed run whose budget is nearly spent ends with this epoch)
            smallest = (self.used() + this_epoch + self.final_reserve(eval_s)) / 60
            raise UsageError(f"a time budget of {self.seconds / 60:g} min is too small for one epoch plus evaluation "
                             f"(about {(epoch_train + eval_s) / 60:.2f} min an epoch here)",
                             fix=f"give at least --time {math.ceil(smallest * 10) / 10:g}, or fewer images / a smaller model")
        more = self.steps_in(spare, epoch_train + eval_s, eval_s, iters)
        info = {"step_s": step_s, "epoch_s": epoch_train + eval_s, "eval_s": eval_s}
        return self._cap((epoch + 1) * iters + more, iters), info

    def end_epoch(self, train_s: float, eval_s: float) -> None:
        self.epoch_times.append(train_s + eval_s)
        self.eval_times.append(eval_s)

    def replan(self, *, steps_done: int, planned: int, iters: int) -> int:
        """After an epoch: the steps in all that still fit the budget, given the measured epoch time (the
        slower of the mean and the last epoch). The plan shrinks whenever it would overrun by more than
        `SHRINK_SLACK` of an epoch; it grows, by at least `MIN_TAIL` of an epoch, only when the extra steps
        fit at a `GROW_MARGIN` slower pace. (Growth late in a cosine schedule raises its low lr a little:
        from 0.7% to 1.8% of the peak when 19 epochs become 19.7 after the 18th.)"""
        epoch_s = max(sum(self.epoch_times) / len(self.epoch_times), self.epoch_times[-1])  # the slower pace
        eval_s = max(self.eval_times)
        spare = self.remaining() - self.final_reserve(eval_s)
        fit = self._cap(steps_done + self.steps_in(spare, epoch_s, eval_s, iters), iters)
        if fit < planned - SHRINK_SLACK * iters:
            return max(fit, steps_done)
        grown = self._cap(steps_done + self.steps_in(spare, epoch_s * GROW_MARGIN, eval_s, iters), iters)
        return grown if grown >= planned + MIN_TAIL * iters else planned


class BudgetPlan:
    """Keeps a run's steps (hence epochs) and learning-rate schedule fitted to its `Budget` (used by `fit`).

    `on_step` wraps the step callback of an epoch to time the first `PLAN_AFTER_STEPS` steps of this
    process and plan from them; `end_epoch` replans from the measured epoch; `state` goes into the
    checkpoint (time used, steps and epochs planned). Under torchrun rank 0's plan is broadcast."""

    def __init__(self, budget: Budget, scheduler, cfg, *, iters: int, train_images: int, val_images: int,
                 planned_steps: int = 0, log=print):
        self.budget, self.scheduler, self.cfg, self.log = budget, scheduler, cfg, log
        self.iters, self.train_images, self.val_images = iters, train_images, val_images
        self.steps = planned_steps  # training steps in all; 0 until planned
        self.times: list[float] | None = []

    @property
    def epochs(self) -> int:
        """Epochs planned, the last one perhaps partial (0 until planned)."""
        return epochs_in(self.steps, self.iters)

    def steps_of(self, epoch: int) -> int:
        """Steps planned for epoch `epoch` (0-based): a whole epoch, or the partial last one's."""
        return max(0, min(self.iters, self.steps - epoch * self.iters))

    def describe(self, steps: int | None = None) -> str:
        steps = self.steps if steps is None else steps
        tail = steps % self.iters
        return f"{epochs_in(steps, self.iters)} epochs" + (f", the last {tail} of {self.iters} steps" if tail else "")

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
        self.log(f"time budget {self.budget.seconds / 60:g} min: {self.describe()} "
                 f"({info['epoch_s']:.1f} s an epoch with evaluation, measured {info['step_s'] * 1000:.0f} ms a step; "
                 f"{self.budget.remaining() / 60:.1f} min left)")

    def end_epoch(self, epoch: int, train_s: float, eval_s: float, steps: int) -> None:
        """After epoch `epoch` (0-based) of `steps` steps (fewer than an epoch's when it was resumed midway
        or is the partial last one)."""
        from cnnkit.engine import distributed as dist

        self.budget.end_epoch(train_s * self.iters / max(1, steps), eval_s)
        if not self.steps:
            return
        done = min(self.steps, (epoch + 1) * self.iters)
        new = self.budget.replan(steps_done=done, planned=self.steps, iters=self.iters) if dist.is_main() else None
        new = dist.broadcast_object(new)
        if new != self.steps and epochs_in(new, self.iters) != self.epochs:  # (a few steps more or less: not logged)
            self.log(f"time budget: {self.describe(new)} instead of {self.describe()} "
                     f"({self.budget.epoch_times[-1]:.1f} s measured for epoch {epoch + 1}, "
                     f"{self.budget.remaining() / 60:.1f} min left)")
        if new != self.steps:
            self._set(new)

    def _set(self, steps: int) -> None:
        from cnnkit.engine.optim import default_steps

        self.steps = steps
        schedule = self.scheduler.lr_lambdas[0]
        schedule.refit(steps, None if self.cfg.steps else default_steps(self.epochs))

    def state(self) -> dict:
        return {"time_used_s": self.budget.used(), "planned_epochs": self.epochs, "planned_steps": self.steps}
