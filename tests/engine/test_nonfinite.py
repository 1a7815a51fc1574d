"""Numerical safety: a NaN / inf loss stops the run with the epoch and step named and weights/last.pt
left at the last good epoch; non-finite weights are never saved; --skip-nonfinite skips such steps
(no weight, optimizer or EMA update; the schedule moves on) and counts them in metrics.csv; the
GradScaler's own overflow handling (fp16) is untouched."""

from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnkit.engine.trainer as trainer
from cnnkit.cli import build_parser, config_from_args
from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import Precision
from cnnkit.engine.device import RunSettings
from cnnkit.engine.loop import DivergedError, EpochPlan, Optimisation, train_one_epoch
from cnnkit.engine.trainer import fit

STEPS = 4  # 64 training images / batch 16


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest.one_thread)


def _cfg(shapes_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                data=str(shapes_dir), epochs=3, batch_size=16, img_size=32, lr=0.02, project=str(tmp_path / "runs"),
                name="t", progress=False, plots=False, seed=3, precision="fp32", channels_last="off", workers=0)
    base.update(kw)
    return TrainConfig(**base)


class _Poisoned:
    """The real task, whose training loss becomes `value` at the chosen global steps (0-based); it
    remembers the weights (and EMA weights) just before each poisoned step."""

    def __init__(self, task, at: dict[int, float]):
        self._task, self.at, self.calls, self.before = task, at, 0, {}

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss(self, model, images, targets):
        loss, parts = self._task.loss(model, images, targets)
        step = self.calls
        self.calls += 1
        if step in self.at:
            self.before[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            loss = loss * self.at[step]
        return loss, parts


def _poison(monkeypatch, at: dict[int, float]) -> list[_Poisoned]:
    made: list[_Poisoned] = []
    real = trainer.get_task

    def get_task(name):
        made.append(_Poisoned(real(name), at))
        return made[-1]

    monkeypatch.setattr(trainer, "get_task", get_task)
    return made


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_loss_names_epoch_and_step_and_keeps_last_good_checkpoint(shapes_dir, tmp_path, monkeypatch, value):
    _poison(monkeypatch, {STEPS + 2: value})  # epoch 2, step 3
    run = tmp_path / "runs" / "classify" / "t"
    kept = tmp_path / "epoch1.pt"

    def keep_epoch1(epoch, step, loss):
        if (epoch, step) == (1, 0):
            shutil.copy(run / "weights" / "last.pt", kept)

    with pytest.raises(DivergedError) as info:
        fit(_cfg(shapes_dir, tmp_path), on_step=keep_epoch1, log=lambda *_: None)
    msg = str(info.value)
    assert f"the loss became {value} at epoch 2, step 3" in msg and "--skip-nonfinite" in msg and "\n" not in msg
    last = ck.load_checkpoint(run / "weights" / "last.pt")  # still loads
    assert last["epoch"] == 0  # the previous (first) epoch's
    assert (run / "weights" / "last.pt").read_bytes() == kept.read_bytes()
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(run)] == ["1"]


def test_nonfinite_weights_are_never_saved(shapes_dir, tmp_path, monkeypatch):
    """A finite loss whose step leaves NaN weights (here: poked in at the last step of epoch 2) is caught
    before the epoch's save: last.pt stays the first epoch's."""
    run = tmp_path / "runs" / "classify" / "t"
    holder = {}

    def poke(epoch, step, loss):
        if (epoch, step) == (1, STEPS - 1):
            holder["bytes"] = (run / "weights" / "last.pt").read_bytes()
            with torch.no_grad():
                next(p for p in holder["model"].parameters()).fill_(float("nan"))

    real_wrap = trainer.dist.wrap

    def wrap(model, *a, **k):
        holder["model"] = model
        return real_wrap(model, *a, **k)

    monkeypatch.setattr(trainer.dist, "wrap", wrap)
    with pytest.raises(DivergedError, match="weights became NaN or infinite by the end of epoch 2"):
        fit(_cfg(shapes_dir, tmp_path), on_step=poke, log=lambda *_: None)
    assert (run / "weights" / "last.pt").read_bytes() == holder["bytes"]
    assert ck.load_checkpoint(run / "weights" / "last.pt")["epoch"] == 0
    assert [r["epoch"] for r in _rows(run)] == ["1"]


def test_skip_nonfinite_skips_counts_and_logs(shapes_dir, tmp_path, monkeypatch):
    at = {1: math.nan, STEPS + 3: math.inf, STEPS + 1: -math.inf}  # epoch 1 step 2; epoch 2 steps 2 and 4
    made = _poison(monkeypatch, at)
    logged: list[str] = []
    after: dict[int, dict] = {}
    losses: list[tuple] = []

    def on_step(epoch, step, loss):
        losses.append((epoch, step, loss))
        g = epoch * STEPS + step
        if g in at:
            after[g] = {k: v.detach().clone() for k, v in made[0].model_now.state_dict().items()}

    real_wrap = trainer.dist.wrap

    def wrap(model, *a, **k):
        made[0].model_now = model
        return real_wrap(model, *a, **k)

    monkeypatch.setattr(trainer.dist, "wrap", wrap)
    res = fit(_cfg(shapes_dir, tmp_path, skip_nonfinite=True, ema=True, ema_decay=0.9),
              on_step=on_step, log=logged.append)
    assert len(losses) == 3 * STEPS  # every step ran (three of them skipped)
    for g in at:  # nothing changed after the poisoned loss: no optimizer step (BatchNorm moved in its forward)
        assert all(torch.equal(made[0].before[g][k], after[g][k]) for k in after[g]), g
    rows = _rows(res.run_dir)
    assert [int(r["skipped_steps"]) for r in rows] == [1, 2, 0]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert sum("1 non-finite step(s) skipped" in line for line in logged) == 1
    assert sum("2 non-finite step(s) skipped" in line for line in logged) == 1
    last = ck.load_checkpoint(res.run_dir / "weights" / "last.pt")
    assert last["ema"]["updates"] == 3 * STEPS - len(at)  # no EMA update on a skipped step
    assert last["scheduler"]["last_epoch"] == 3 * STEPS  # the schedule still steps
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_skip_nonfinite_flag_and_default():
    parser = build_parser()
    on = parser.parse_args(["train", "classify", "--skip-nonfinite"])
    off = parser.parse_args(["train", "classify"])
    assert config_from_args("classify", on)[0].skip_nonfinite is True
    assert config_from_args("classify", off)[0].skip_nonfinite is False


class _TinyTask:
    def prepare(self, images):
        return images

    def move_targets(self, targets, device):
        return targets

    def __init__(self, scale_at: dict[int, float]):
        self.scale_at, self.calls = scale_at, 0

    def loss(self, model, images, targets):
        loss = F.cross_entropy(model(images).float(), targets)
        factor = self.scale_at.get(self.calls, 1.0)
        self.calls += 1
        return loss * factor, {}


def test_grad_scaler_overflow_still_skips_and_nan_loss_skip_leaves_the_scaler_alone():
    """fp16 with a GradScaler: a finite loss whose scaled gradients overflow is the scaler's business
    (step skipped, scale halved, no DivergedError); a NaN loss with skip_nonfinite never reaches the
    scaler (its scale stays), and training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))) for _ in range(6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    snapshots = []
    task = _TinyTask({1: 1e30, 3: math.nan})  # step 2: gradients overflow fp16; step 4: NaN loss

    def on_step(epoch, step, loss):
        snapshots.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))

    before = [p.detach().clone() for p in model.parameters()]
    out = train_one_epoch(model, task, data, Optimisation(opt, sched, scaler, skip_nonfinite=True),
                          RunSettings(torch.device("cpu"), Precision("fp16", torch.float16, "cpu")),
                          EpochPlan(progress=False, on_step=on_step))
    weights = [before] + [w for w, _ in snapshots]
    changed = [not all(torch.equal(a, b) for a, b in zip(weights[i], weights[i + 1])) for i in range(6)]
    assert changed == [True, False, True, False, True, True]
    assert [s for _, s in snapshots] == [2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**15, 2.0**15]
    assert out["skipped_steps"] == 1 and math.isfinite(out["train_loss"])
    assert sched.last_epoch == 6
