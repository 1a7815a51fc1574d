"""`--time MINUTES`: epochs derived from the measured steps, the lr schedule fitted to them, a resumed run
keeping what is left of the budget, the end inside the budget, and the bad budgets refused.

The runs here use a virtual clock (every training step costs STEP_S seconds and every evaluation EVAL_S,
whatever this shared machine is doing), so the epochs a budget allows are computed by hand and the
tests never depend on real timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cnnkit.engine import budget as budget_module
from cnnkit.engine import checkpoint as ck
from cnnkit.engine import loop as loop_module
from cnnkit.engine import trainer as trainer_module
from cnnkit.engine.budget import Budget, check_minutes
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.loop import TrainingInterrupted
from cnnkit.engine.optim import Schedule, build_scheduler
from cnnkit.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
STEP_S, EVAL_S = 1.0, 2.0
ITERS = 4  # 64 training images of shapes_dir / batch 16


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest.one_thread)


class VirtualClock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Time inside `fit` is virtual: STEP_S a training step, EVAL_S an evaluation."""
    c = VirtualClock()
    fake_time = types.SimpleNamespace(perf_counter=c.perf_counter, monotonic=c.perf_counter, time=c.perf_counter)
    for module in (budget_module, loop_module, trainer_module):
        monkeypatch.setattr(module, "time", fake_time)
    evaluate = trainer_module.evaluate

    def timed_evaluate(*args, **kwargs):
        c.now += EVAL_S
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", timed_evaluate)
    return c


def _cfg(shapes_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1}, data=str(shapes_dir),
                epochs=0, time=1.0, batch_size=16, img_size=32, lr=0.05, warmup_epochs=0.5, precision="fp32",
                channels_last="off", workers=0, seed=0, project=str(tmp_path / "runs"), name="t", plots=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _expected_epochs(budget_s: float) -> int:
    """By hand, as module cnnkit.engine.budget plans it: the first epoch (4 steps) is measured whole, then every
    epoch costs 4 s + 2 s of evaluation, and the final pictures / report are given one evaluation + 4 s."""
    epoch_s = ITERS * STEP_S + EVAL_S
    reserve = EVAL_S + budget_module.FINAL_FIXED_S
    return 1 + int((budget_s - epoch_s - reserve) // epoch_s)


def test_epochs_come_from_the_budget_and_the_schedule_is_fitted(shapes_dir, tmp_path, clock):
    lines: list[str] = []
    res = trainer_module.fit(_cfg(shapes_dir, tmp_path), on_step=lambda *a: setattr(clock, "now", clock.now + STEP_S),
                             log=lines.append)
    n = _expected_epochs(60.0)
    assert n == 9
    assert len(res.history) == n
    last = ck.load_checkpoint(res.run_dir / "weights" / "last.pt")
    assert last["planned_epochs"] == n and last["epoch"] == n - 1
    assert last["time_used_s"] <= 60.0  # inside the budget; what follows (report) was reserved for
    schedule = last["scheduler"]["lr_lambdas"][0]
    assert schedule["total_iters"] == n * ITERS and schedule["warmup_iters"] == ITERS // 2
    assert res.history[-1]["lr"] == pytest.approx(0.05 * 0.01)  # the cosine ends exactly at the last step
    assert any(ln.startswith("time budget 1 min: ") and " an epoch with evaluation" in ln for ln in lines)  # the first plan
    assert any(ln.startswith(f"time budget: {n} epochs instead of ") for ln in lines)  # refitted after epoch 1
    assert "time budget 1 min" in next(ln for ln in lines if "device cpu" in ln)  # the header line


def test_time_short_of_a_whole_epoch_goes_to_a_partial_last_one_and_resume_keeps_it(shapes_dir, tmp_path, clock):
    """64 s: after the 9 whole epochs of 6 s and the 6 s reserve, 4 s are left: the evaluation (2 s) and 2 of
    the 4 steps of a 10th epoch. Stopped in that epoch and resumed, the run still ends with those 2 steps."""
    def step(e, s, loss):
        clock.now += STEP_S
        if (e, s) == (9, 0):
            os.kill(os.getpid(), signal.SIGINT)

    cfg = dict(time=64 / 60, name="tail")
    with pytest.raises(TrainingInterrupted) as info:
        trainer_module.fit(_cfg(shapes_dir, tmp_path, **cfg), on_step=step, log=lambda *_: None)
    saved = ck.load_checkpoint(info.value.checkpoint)
    assert saved["planned_steps"] == 9 * ITERS + 2 and saved["planned_epochs"] == 10 and saved["step"] == 1
    lines: list[str] = []
    res = trainer_module.fit(_cfg(shapes_dir, tmp_path, **cfg), resume=str(info.value.checkpoint),
                             on_step=lambda *a: setattr(clock, "now", clock.now + STEP_S), log=lines.append)
    last = ck.load_checkpoint(res.run_dir / "weights" / "last.pt")
    assert len(res.history) == 10 and last["epoch"] == 9
    assert last["scheduler"]["last_epoch"] == 9 * ITERS + 2  # the optimizer steps taken in all
    assert last["scheduler"]["lr_lambdas"][0]["total_iters"] == 9 * ITERS + 2
    assert res.history[-1]["lr"] == pytest.approx(0.05 * 0.01)  # the cosine still ends at the last step
    assert last["time_used_s"] <= 64.0
    assert any("10 epochs, the last 2 of 4 steps planned" in ln for ln in lines), lines  # the resumed header


def test_steps_in_by_hand():
    # whole epochs of 6 s (2 s of it evaluation, 1 s a step of 4), then a partial one of at least a quarter
    assert Budget.steps_in(52.0, 6.0, 2.0, 4) == 8 * 4 + 2
    assert Budget.steps_in(49.0, 6.0, 2.0, 4) == 8 * 4  # 1 s left: not even the evaluation
    assert Budget.steps_in(60.0, 10.0, 2.0, 32) == 6 * 32  # nothing left over
    assert Budget.steps_in(15.0, 10.0, 2.0, 32) == 32 + 12  # 5 s - 2 s of evaluation = 12 of 32 steps (0.25 s each)
    assert Budget.steps_in(14.0, 10.0, 2.0, 32) == 32 + 8  # 2 s = 8 steps: exactly a quarter
    assert Budget.steps_in(13.5, 10.0, 2.0, 32) == 32  # 6 steps: under a quarter, not worth its evaluation
    assert Budget.steps_in(-1.0, 10.0, 2.0, 32) == 0


def test_replan_shrinks_past_a_slack_and_grows_by_a_quarter_epoch_or_not_at_all():
    b = Budget(100.0)
    b.end_epoch(4.5, 0.5)  # 5 s an epoch of 10 steps, evaluation included; ~95.5 s spare after the reserve
    assert b.replan(steps_done=50, planned=100, iters=10) > 100  # room for more: grown
    tight = Budget(100.0, used_before=50.0)  # 50 s left, 45.5 s after the reserve: 8 epochs + 3 steps at 1.1x pace
    tight.end_epoch(4.5, 0.5)
    assert tight.replan(steps_done=50, planned=50 + 80, iters=10) == 130  # under a quarter epoch more: kept
    assert tight.replan(steps_done=50, planned=50 + 75, iters=10) > 125  # a quarter epoch or more: grown
    slow = Budget(100.0, used_before=90.0)
    slow.end_epoch(4.5, 0.5)  # 10 s left, 4.5 s of them the reserve: one whole epoch, no room for a partial one
    assert slow.replan(steps_done=80, planned=100, iters=10) == 90
    assert slow.replan(steps_done=80, planned=90, iters=10) == 90
    slow100 = Budget(100.0, used_before=90.0)  # the same with 100 steps an epoch: 5 steps are 5% of it
    slow100.end_epoch(4.5, 0.5)
    assert slow100.replan(steps_done=800, planned=903, iters=100) == 903  # 3 steps over: no reason to cut
    assert slow100.replan(steps_done=800, planned=910, iters=100) == 900


def test_with_epochs_whichever_ends_first(shapes_dir, tmp_path, clock):
    step = lambda *a: setattr(clock, "now", clock.now + STEP_S)  # noqa: E731
    res = trainer_module.fit(_cfg(shapes_dir, tmp_path, epochs=3, name="e3"), on_step=step, log=lambda *_: None)
    assert len(res.history) == 3  # the epochs end first
    res = trainer_module.fit(_cfg(shapes_dir, tmp_path, epochs=50, name="e50"), on_step=step, log=lambda *_: None)
    assert len(res.history) == _expected_epochs(60.0)  # the budget ends first


def test_a_resumed_run_keeps_the_rest_of_the_budget(shapes_dir, tmp_path, clock):
    def step(e, s, loss):
        clock.now += STEP_S
        if (e, s) == (3, 1):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        trainer_module.fit(_cfg(shapes_dir, tmp_path), on_step=step, log=lambda *_: None)
    saved = ck.load_checkpoint(info.value.checkpoint)
    used = saved["time_used_s"]
    assert used == pytest.approx(3 * (ITERS * STEP_S + EVAL_S) + 2 * STEP_S)  # 3 epochs and 2 steps
    clock.now += 3600  # an hour passes between the runs: it is not charged to the budget
    lines: list[str] = []
    res = trainer_module.fit(_cfg(shapes_dir, tmp_path), resume=str(info.value.checkpoint),
                             on_step=lambda *a: setattr(clock, "now", clock.now + STEP_S), log=lines.append)
    last = ck.load_checkpoint(res.run_dir / "weights" / "last.pt")
    assert len(res.history) == _expected_epochs(60.0)  # the same epochs as the uninterrupted run
    assert last["time_used_s"] <= 60.0
    assert any("time budget 1 min (" in ln and "min left" in ln for ln in lines), lines


def test_the_end_stays_within_the_budget_when_steps_get_slower(shapes_dir, tmp_path, clock):
    """Steps twice as slow from epoch 3 on: the plan is cut, and training still ends inside the budget
    plus at most one epoch's evaluation."""
    def step(e, s, loss):
        clock.now += STEP_S * (2 if e >= 2 else 1)

    res = trainer_module.fit(_cfg(shapes_dir, tmp_path), on_step=step, log=lambda *_: None)
    last = ck.load_checkpoint(res.run_dir / "weights" / "last.pt")
    assert len(res.history) < _expected_epochs(60.0)
    assert last["time_used_s"] <= 60.0 + EVAL_S
    assert last["scheduler"]["lr_lambdas"][0]["total_iters"] == len(res.history) * ITERS


def test_a_budget_too_small_for_one_epoch_says_the_smallest_that_works(shapes_dir, tmp_path, clock):
    with pytest.raises(UsageError) as info:
        trainer_module.fit(_cfg(shapes_dir, tmp_path, time=0.1),
                           on_step=lambda *a: setattr(clock, "now", clock.now + STEP_S), log=lambda *_: None)
    msg = str(info.value)
    assert "too small for one epoch plus evaluation" in msg and "--time 0.2" in msg  # 4 + 0.75 + 0.75 + 4 s
    assert "\n" not in msg


@pytest.mark.parametrize("value", [0, -1, "abc", float("inf"), float("nan")])
def test_check_minutes_refuses(value):
    with pytest.raises(UsageError):
        check_minutes(value)


@pytest.mark.parametrize("value", ["0", "-2", "ten"])
def test_cli_refuses_a_bad_time_in_one_line(value, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "train", "classify", "--time", value, "--project",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--time" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "classify").exists()  # nothing was started


def test_plan_by_hand():
    b = Budget(100.0)
    steps, info = b.plan_from_steps(epoch=0, step_s=0.1, steps_left=40, iters=50, train_images=500, val_images=100)
    # an epoch 5 s + its evaluation 0.5 x 5 x 100 / 500 = 0.5 s; this epoch's rest 4.5 s; reserve 0.5 + 4 s:
    # 91 s = 16 more whole epochs (88 s) + 3 s, of which 2.5 s after its evaluation = 25 steps of a 17th (half of 50)
    assert info["epoch_s"] == pytest.approx(5.5)
    assert 17 * 50 + 24 <= steps <= 17 * 50 + 25  # (24 when 2.5 / 0.1 rounds below 25)
    assert Budget(100.0, max_epochs=5).plan_from_steps(epoch=0, step_s=0.1, steps_left=40, iters=50, train_images=500,
                                                       val_images=100)[0] == 5 * 50


def test_schedule_refit_keeps_warmup_and_ends_at_the_floor():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, total_iters=100, warmup_iters=10, schedule="cosine", iters_per_epoch=10)
    s: Schedule = sched.lr_lambdas[0]
    before = [s(i) for i in range(10)]
    s.refit(40)
    assert [s(i) for i in range(10)] == before  # the warm-up is untouched
    assert s(40) == pytest.approx(0.01) and s(25) == pytest.approx(0.01 + 0.99 * 0.5)
    state = sched.state_dict()
    fresh = build_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), total_iters=100, warmup_iters=10,
                            schedule="cosine", iters_per_epoch=10)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total_iters == 40  # a resumed run gets the fitted schedule back
    step = build_scheduler(opt, total_iters=100, warmup_iters=0, schedule="step", iters_per_epoch=10, steps=[5, 8])
    step.lr_lambdas[0].refit(40, [2, 3])
    assert step.lr_lambdas[0](25) == pytest.approx(0.1) and step.lr_lambdas[0](35) == pytest.approx(0.01)
