"""`fit`: a whole training run, resumable, writing everything under `runs/<task>/<name>/`.

Layout of a run: config.yaml, metrics.csv, results.png (curves), weights/last.pt (every epoch),
weights/best.pt (best validation fitness), plus what the task draws after the final evaluation.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import cnnkit
from cnnkit.engine import checkpoint as ck
from cnnkit.engine import distributed as dist
from cnnkit.engine.config import TrainConfig, check_model_for_task
from cnnkit.engine.runs import (make_loader, new_run_dir, plot_curves, read_metrics_csv,  # noqa: F401  (re-exported)
                                write_metrics_csv)
from cnnkit.engine.finetune import backbone_parameters, freeze_early, is_frozen_at, set_backbone_frozen, train_mode
from cnnkit.engine.budget import PLAN_AFTER_STEPS, Budget, BudgetPlan, check_minutes, epochs_in
from cnnkit.engine.device import RunSettings, fp32_depthwise, resolve_device, resolve_precision
from cnnkit.engine.probe import Choice, ProbeRequest, choose, model_id
from cnnkit.engine.loop import (DivergedError, EpochPlan, Optimisation, StopRequest, TrainingInterrupted, evaluate,
                               train_one_epoch)
from cnnkit.engine.optim import ModelEMA, build_optimizer, build_scheduler, default_steps, parameter_groups
from cnnkit.errors import UsageError, WeightsError
from cnnkit.taskapi import get_task


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    best_fitness: float
    history: list[dict[str, Any]]


def checkpoint_dict(s: "_Session", *, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What last.pt / best.pt hold after `epoch` (0-based) of the session `s`."""
    cfg, model, ema, opt = s.cfg, s.model, s.opt.ema, s.opt
    ema_model = ema.module if ema is not None else model
    return {
        "version": cnnkit.__version__,
        "task": s.task.name,
        "model": {"name": model.cnnkit_name, "kwargs": dict(model.cnnkit_kwargs)},
        "names": list(s.data.names),
        "preprocess": dict(s.data.meta),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items()},
        "train_state_dict": ({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                             if ema is not None else None),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
        "epoch": epoch,
        "best_fitness": s.best,
        "config": cfg.to_dict(),
        "rng": ck.rng_state(),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        **(s.plan.state() if s.plan else {}),
    }


def _scalar_row(epoch: int, train: dict, val: dict, lr: float) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch}
    row.update({k: round(v, 6) for k, v in train.items() if k.startswith("train_") and k != "train_time_s"})
    row.update({f"val_{k}": round(float(v), 6) for k, v in val.items() if isinstance(v, (int, float))})
    row.update(lr=lr, images_per_s=round(train["images_per_s"], 1), epoch_time_s=round(train["train_time_s"], 2),
               skipped_steps=train.get("skipped_steps", 0))
    return row


def _all_finite(*state_dicts) -> bool:
    return all(bool(torch.isfinite(v).all()) for sd in state_dicts if sd for v in sd.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of atomic writes that a killed process left behind (the real files are intact)."""
    for folder in (run_dir, run_dir / "weights"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _load_resume(path: str, cfg: TrainConfig, explicit_model: bool) -> dict[str, Any]:
    ckpt = ck.load_checkpoint(path)
    for key in ("config", "model", "optimizer", "epoch"):
        if key not in ckpt:
            raise WeightsError(f"not a resumable training checkpoint (no {key!r})", path=path,
                               fix="resume from runs/<task>/<name>/weights/last.pt")
    saved = ckpt["config"]
    if saved.get("task") != cfg.task:
        raise WeightsError(f"checkpoint is from a {saved.get('task')!r} run, not {cfg.task!r}", path=path,
                           fix=f"use `cnnkit train {saved.get('task')} --resume {path}`")
    from cnnkit.models import get_entry

    if explicit_model and get_entry(ckpt["model"]["name"]).name != get_entry(cfg.model).name:
        raise WeightsError(f"checkpoint holds model {ckpt['model']['name']!r}, not {cfg.model!r}", path=path,
                           fix=f"drop --model or use --model {ckpt['model']['name']}")
    return ckpt


def _check_finite(state: dict[str, Any], where: str) -> None:
    """Weights that became NaN / inf are never saved: last.pt keeps the last good state."""
    if not _all_finite(state["state_dict"], state["train_state_dict"]):
        raise DivergedError(f"the weights became NaN or infinite by {where}; weights/last.pt still holds the "
                            "last good checkpoint", fix="lower --lr, raise --warmup-epochs, or set --clip-grad 10")


def _save_if_finite(path: Path, state: dict[str, Any], where: str) -> None:
    _check_finite(state, where)
    ck.save_checkpoint(path, state)


def choose_training_settings(cfg: TrainConfig, task, model, data, device: torch.device, batch: int, log) -> Choice:
    """Precision and memory layout of the run: forced by --precision / --channels-last, else measured on
    this model at this batch and input size (`cnnkit.engine.probe`); rank 0 measures, every process uses it."""
    probe_batch: list = []  # read only when a measurement is needed (not on a cache hit)

    def step(m, precision, channels_last):
        if not probe_batch:
            collate = data.collate_fn or torch.utils.data.default_collate
            probe_batch.extend(collate([data.train[i] for i in range(min(batch, len(data.train)))]))
        images, targets = probe_batch
        train_mode(m)
        run = RunSettings(device, precision, channels_last)
        with run.autocast():
            loss, _ = task.loss(m, run.inputs(images, task), task.move_targets(targets, device))
        loss.backward()
        for p in m.parameters():
            p.grad = None

    choice = None
    if dist.is_main():
        choice = choose(model, ProbeRequest(device=device, precision=cfg.precision, channels_last=cfg.channels_last,
                                            model_id=model_id(model, cfg.task), shape=(batch, *_sample_shape(data.train[0])),
                                            kind="train"), step=step, log=log)
    return dist.broadcast_object(choice)


def _sample_shape(sample) -> tuple:
    image = sample[0] if isinstance(sample, (tuple, list)) else sample
    return tuple(getattr(image, "shape", ()))


def _silent(*args, **kwargs) -> None:
    """The log of every process but rank 0."""


def fit(cfg: TrainConfig, *, resume: str | None = None, explicit_model: bool = False,
        extend_epochs: int | None = None, log=print, on_step=None) -> RunResult:
    """Train per `cfg`; with `resume`, continue a run exactly where its last.pt stopped.

    Under torchrun every process runs this (see `cnnkit.engine.distributed`): `cfg.batch_size` is the
    global batch, the model is DDP-wrapped, metrics are computed on what all processes predicted, and
    only rank 0 logs and writes files. A run resumes on any number of processes.

    SIGINT (Ctrl-C) and SIGTERM stop training after the current step: last.pt then holds that step
    (mid-epoch: the step within the epoch, the random state, and the epoch's partial sums, so that
    --resume skips the batches already done and continues as the uninterrupted run would), and
    `TrainingInterrupted` is raised (the CLI exits 130 / 143). Under torchrun every process stops at
    the same step and rank 0 writes. The previous signal handlers are restored when `fit` returns.
    A NaN / inf loss raises `DivergedError` (or is skipped with `cfg.skip_nonfinite`); weights that
    became non-finite are never saved, so last.pt keeps the last good epoch."""
    stop = StopRequest()
    with stop.installed():
        s = _prepare(cfg, resume=resume, explicit_model=explicit_model, extend_epochs=extend_epochs, log=log)
        s.stop, s.on_step = stop, on_step
        _build_training(s)
        if s.ckpt is not None:
            _restore(s)
        elif dist.is_main():
            s.run_dir.mkdir(parents=True, exist_ok=s.cfg.exist_ok)
            ck.atomic_write_text(s.run_dir / "config.yaml", yaml.safe_dump(s.cfg.to_dict(), sort_keys=False))
        _start(s)
        try:
            interrupted = _train_epochs(s)
            return _finish(s, interrupted)
        finally:
            if s.frozen_fold is not None:
                s.frozen_fold.undo()


@dataclass
class _Session:
    """Everything one training run holds while it trains (built by `_prepare` and `_build_training`)."""

    cfg: TrainConfig
    task: Any
    run_dir: Path
    log: Any
    ckpt: dict[str, Any] | None
    resume: str | None
    extend_epochs: int | None
    started_group: bool = False
    budget: Budget | None = None
    batch: int = 0
    data: Any = None
    frozen_fold: Any = None  # engine/fold.FrozenFold while an fp32 run folds its frozen early BatchNorms
    model: Any = None
    run: RunSettings | None = None
    choice: Choice | None = None
    opt: Optimisation | None = None
    train_loader: Any = None
    val_loader: Any = None
    train_model: Any = None
    iters: int = 0
    epochs: int = 0
    planned: int = 0
    plan: BudgetPlan | None = None
    stop: StopRequest | None = None
    on_step: Any = None
    start_epoch: int = 0
    start_step: int = 0
    best: float = float("-inf")
    history: list = field(default_factory=list)
    partial: dict | None = None
    resume_rng: dict | None = None
    metrics: dict = field(default_factory=dict)  # of this process's last evaluation (the task draws from it)
    saved_metrics: dict = field(default_factory=dict)

    @property
    def last_pt(self) -> Path:
        return self.run_dir / "weights" / "last.pt"


def _prepare(cfg: TrainConfig, *, resume, explicit_model, extend_epochs, log) -> _Session:
    """The run's folder, task, device, budget and data and model (before any training state)."""
    ckpt = None
    if resume:
        ckpt = _load_resume(resume, cfg, explicit_model)
        cfg = TrainConfig.from_dict(ckpt["config"])
        if extend_epochs:
            cfg.epochs = extend_epochs
        run_dir = Path(resume).resolve().parent.parent
    else:
        check_model_for_task(cfg.task, cfg.model)  # another task's model: one line, before any data is read
        run_dir = new_run_dir(cfg.project, cfg.task, cfg.name, cfg.exist_ok)
    task = get_task(cfg.task)
    device, started_group = dist.setup(resolve_device(cfg.device))
    if device.type == "cuda":  # fixed input sizes: let cuDNN time its algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
    run_dir = dist.broadcast_object(run_dir)  # rank 0 chose the (numbered) folder
    s = _Session(cfg, task, run_dir, log if dist.is_main() else _silent, ckpt, resume, extend_epochs, started_group)
    if cfg.time:
        check_minutes(cfg.time)
    if (cfg.epochs < 1 and not cfg.time) or cfg.epochs < 0 or cfg.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1 (--epochs 0 only with --time)")
    s.budget = Budget(cfg.time * 60, used_before=float((ckpt or {}).get("time_used_s") or 0.0),
                      max_epochs=cfg.epochs) if cfg.time else None
    s.batch = dist.per_process_batch(cfg.batch_size)
    ck.seed_everything(cfg.seed)  # the same initial weights in every process (DDP broadcasts rank 0's anyway)
    with dist.main_first():  # a built-in data set is generated once, by rank 0
        s.data = task.build_data(cfg)
    # a resumed run rebuilds the architecture only: its own checkpoint holds the weights
    s.model = task.build_model(dataclasses.replace(cfg, weights=None) if ckpt is not None else cfg, s.data).to(device)
    saved_pre = (ckpt or {}).get("preprocess") or {}
    if "mean" in saved_pre and "std" in saved_pre:  # the input normalisation the run started with
        s.data.meta.update(mean=list(saved_pre["mean"]), std=list(saved_pre["std"]))
        task.configure(s.data.meta)
    s.run = RunSettings(device, resolve_precision("fp32", device))
    return s


def _build_training(s: _Session) -> None:
    """Layout and precision, loaders, optimizer, schedule, scaler and EMA."""
    cfg, model, data, device = s.cfg, s.model, s.data, s.run.device
    if cfg.sync_bn:
        model = s.model = dist.convert_sync_batchnorm(model, device)
    if cfg.freeze_early:
        n_early = freeze_early(model, cfg.freeze_early)
        s.log(f"backbone layers at stride <= {cfg.freeze_early} kept frozen ({n_early} tensors)")
    s.choice = choose_training_settings(cfg, s.task, model, data, device, s.batch, s.log)
    s.run = RunSettings(device, s.choice.precision, s.choice.channels_last)
    if s.run.channels_last:
        model = s.model = model.to(memory_format=torch.channels_last)
    fp32_depthwise(model, device, s.run.precision)
    ck.seed_everything(cfg.seed + dist.rank())  # augmentation: a stream of its own in each process
    s.train_loader = make_loader(data.train, cfg, shuffle=True, collate_fn=data.collate_fn, in_memory=data.in_memory,
                                 device=device, batch_size=s.batch, sampler=dist.train_sampler(data.train, cfg.seed))
    s.val_loader = make_loader(data.val, cfg, shuffle=False, collate_fn=data.collate_fn, in_memory=data.in_memory,
                               device=device, batch_size=s.batch * 2, sampler=dist.val_sampler(data.val))
    backbone = backbone_parameters(model) if (cfg.freeze_backbone or cfg.backbone_lr_scale != 1.0) else []
    groups = parameter_groups(model, cfg.weight_decay, cfg.lr, backbone=backbone,
                              backbone_lr_scale=cfg.backbone_lr_scale)
    optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum)
    s.iters = iters = len(s.train_loader)
    # the epochs of this run: --epochs, or what a resumed --time run planned (a fresh one plans after its first steps)
    saved = {} if s.extend_epochs else (s.ckpt or {})
    s.planned = int(saved.get("planned_steps") or int(saved.get("planned_epochs") or 0) * iters)  # training steps
    # (a budget's provisional 1000 epochs: a flat lr until it plans)
    s.epochs = epochs_in(s.planned, iters) or cfg.epochs or (1000 if s.budget else 1)
    steps = list(cfg.steps) or default_steps(s.epochs)
    scheduler = build_scheduler(optimizer, total_iters=s.epochs * iters, warmup_iters=int(cfg.warmup_epochs * iters),
                                schedule=cfg.schedule, iters_per_epoch=iters, steps=steps, gamma=cfg.gamma)
    scaler = torch.amp.GradScaler(device.type) if s.run.precision.needs_scaler else None
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    s.opt = Optimisation(optimizer, scheduler, scaler, ema, cfg.clip_grad, cfg.skip_nonfinite)


def _restore(s: _Session) -> None:
    """A resumed run: weights, optimizer, schedule, EMA, scaler, random state and history from last.pt."""
    ckpt, opt = s.ckpt, s.opt
    try:
        s.model.load_state_dict(ckpt["train_state_dict"] or ckpt["state_dict"])
    except RuntimeError as exc:
        raise WeightsError(f"checkpoint does not fit the model: {str(exc).splitlines()[0]}", path=s.resume) from None
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    if opt.ema is not None and ckpt.get("ema"):
        opt.ema.load_state_dict(ckpt["ema"])
    if opt.scaler is not None and ckpt.get("scaler"):
        opt.scaler.load_state_dict(ckpt["scaler"])
    s.start_epoch, s.best = int(ckpt["epoch"]) + 1, float(ckpt["best_fitness"])
    s.start_step = int(ckpt.get("step") or 0)  # a checkpoint written on a signal, mid-epoch
    s.history = [r for r in read_metrics_csv(s.run_dir / "metrics.csv") if r.get("epoch", 0) <= s.start_epoch]
    s.saved_metrics = dict(ckpt.get("metrics") or {})
    if s.start_step:  # the epoch's start state (its loader draws its seed from it), then the step's
        ck.set_rng_state(ckpt["epoch_rng"])
        s.resume_rng, s.partial = ckpt["rng"], ckpt.get("partial")
    else:
        ck.set_rng_state(ckpt["rng"])  # rank 0's; the other processes draw from streams of their own
    if dist.rank() > 0:
        ck.seed_everything(dist.seed_for_process(s.cfg.seed, s.start_epoch))
        s.resume_rng = None
    if dist.is_main():
        _remove_stale_temp_files(s.run_dir)
    s.log(f"resuming {s.run_dir} at epoch {s.start_epoch + 1}/{s.epochs}"
          + (f", step {s.start_step + 1}/{s.iters}" if s.start_step else ""))


def _fold_frozen_layers(s: _Session):
    """In fp32, the BatchNorm layers that `--freeze-early` keeps frozen are fixed affine maps: fold them into
    the frozen convolutions before them for the training forward (`cnnkit.engine.fold.FrozenFold`; the
    detector's step measured 1.12x faster under the AVX2 stand-in). The same function to about 1e-6 of
    its scale; with bf16 the folded weights would round differently from the model that is saved and
    evaluated, so bf16 runs keep BatchNorm (and so do --compile runs). Called after a resume restored the
    weights; None when nothing is folded."""
    from cnnkit.engine.fold import FrozenFold

    if not s.cfg.freeze_early or s.run.precision.dtype is not None or s.cfg.compile:
        return None
    state = ck.rng_state()  # reading a sample runs its augmentation: the run's random stream must not move
    try:
        shape = _sample_shape(s.data.train[0])
    finally:
        ck.set_rng_state(state)
    images = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fold = FrozenFold(s.model, s.run.inputs(images, s.task), getattr(s.model, "cnnkit_early_frozen", ()))
    if fold.pairs:
        s.log(f"frozen early layers: BatchNorm folded into the convolution before it in {len(fold.pairs)} of them "
              "for the training forward (fp32; the saved weights are the model's own)")
    return fold


def _start(s: _Session) -> None:
    """The training model (DDP-wrapped under torchrun, compiled with --compile), the budget's plan, the header line."""
    cfg = s.cfg
    s.frozen_fold = _fold_frozen_layers(s)
    # the model that trains: DDP-wrapped under torchrun; `model` stays the bare one that is saved
    s.train_model = dist.wrap(s.model, s.run.device, find_unused_parameters=bool(cfg.freeze_backbone))
    if cfg.compile:  # the training forward/backward only; evaluation and checkpoints use the bare model
        s.train_model = torch.compile(s.train_model)
    n_params = sum(p.numel() for p in s.model.parameters())
    budget = s.budget
    s.plan = BudgetPlan(budget, s.opt.scheduler, cfg, iters=s.iters, train_images=len(s.data.train),
                        val_images=len(s.data.val), planned_steps=s.planned, log=s.log) if budget else None
    s.log(f"{cfg.task}: {s.model.cnnkit_name} ({n_params:,} parameters) on {s.data.source}; device {s.run.device}, "
          f"{s.choice.describe()}, {s.train_loader.num_workers} workers"
          + (f", time budget {cfg.time:g} min ({budget.remaining() / 60:.1f} min left; "
             + (f"{s.plan.describe()} planned)" if s.planned else f"epochs planned after the first {PLAN_AFTER_STEPS} steps)")
             if budget else "")
          + (f", {dist.world_size()} processes x {s.batch} images a step" if dist.world_size() > 1 else "")
          + f" -> {s.run_dir}")


def _train_epochs(s: _Session) -> tuple[int, int, int] | None:
    """The epochs; returns (signal, epoch, step within it) when a signal stopped them, else None."""
    cfg = s.cfg
    steps_done = s.start_epoch * s.iters + s.start_step
    epoch = s.start_epoch
    while epoch < s.epochs:
        if cfg.max_steps and steps_done >= cfg.max_steps:
            break
        if cfg.freeze_backbone:
            frozen = is_frozen_at(epoch, cfg.freeze_backbone, cfg.unfreeze_at)
            if set_backbone_frozen(s.model, frozen) and (epoch > s.start_epoch or not frozen):
                s.log(f"epoch {epoch + 1}: backbone {'frozen' if frozen else 'unfrozen'}")
        t0 = time.perf_counter()
        s.train_loader.sampler.set_epoch(epoch)  # the order of each epoch: seed + epoch, whatever the world size
        epoch_rng = ck.rng_state()  # saved with a mid-epoch checkpoint: the loader of this epoch starts from it
        first = epoch == s.start_epoch
        plan = EpochPlan(epoch=epoch, epochs=s.epochs, max_steps=_step_limit(s, epoch, steps_done, first),
                         progress=cfg.progress and dist.is_main(),
                         on_step=s.plan.on_step(s.on_step, epoch) if s.plan else s.on_step, stop=s.stop,
                         start_step=s.start_step if first else 0, resume_rng=s.resume_rng if first else None,
                         resume_totals=s.partial if first else None)
        train = train_one_epoch(s.train_model, s.task, s.train_loader, s.opt, s.run, plan)
        steps_done += train["steps"]
        if s.plan and not s.plan.epochs and train["steps"] and train["interrupted_at"] is None:
            s.plan.plan(epoch, train["train_time_s"] / train["steps"], 0)  # fewer steps than the planning needs
        if train["interrupted_at"] is not None:  # a signal: save this step and stop
            if dist.is_main():
                state = checkpoint_dict(s, epoch=epoch - 1, metrics=s.metrics or s.saved_metrics)
                state.update(step=train["interrupted_at"], epoch_rng=epoch_rng, partial=train["totals"])
                _save_if_finite(s.last_pt, state, f"epoch {epoch + 1}, step {train['interrupted_at']}")
            return (s.stop.signum or signal.SIGTERM, epoch, train["interrupted_at"])
        _end_epoch(s, epoch, train, t0)
        # a signal during evaluation or the saves: last.pt already holds this epoch (the same answer on every process)
        if dist.average([float(bool(s.stop.signum))], s.run.device)[0] > 0 and epoch + 1 < s.epochs:
            return (s.stop.signum or signal.SIGTERM, epoch + 1, 0)
        epoch += 1
    return None


def _step_limit(s: _Session, epoch: int, steps_done: int, first: bool) -> int:
    """The most steps epoch `epoch` may take in this call (0 = all of it): what --max-steps leaves, and the
    budget's partial last epoch (less the steps a resumed epoch already did)."""
    limits = [s.cfg.max_steps - steps_done] if s.cfg.max_steps else []
    planned = s.plan.steps_of(epoch) if s.plan and s.plan.steps else s.iters
    if planned < s.iters:
        limits.append(max(1, planned - (s.start_step if first else 0)))
    return min(limits) if limits else 0


def _end_epoch(s: _Session, epoch: int, train: dict[str, Any], t0: float) -> None:
    """Evaluate, replan the budget, write metrics.csv, best.pt, last.pt and the curves, log the epoch."""
    task, ema = s.task, s.opt.ema
    eval_model = ema.module if ema is not None else s.model
    dist.broadcast_buffers(eval_model)  # every process evaluates the model rank 0 saves
    t_eval = time.perf_counter()
    s.metrics = metrics = evaluate(eval_model, task, s.val_loader, s.run, names=s.data.names)
    if s.plan:
        s.plan.end_epoch(epoch, train["train_time_s"], time.perf_counter() - t_eval, train["steps"])
        s.epochs = s.plan.epochs or s.epochs
    fitness = float(metrics[task.fitness])
    is_best = fitness > s.best
    s.best = max(s.best, fitness)
    s.history.append(_scalar_row(epoch + 1, train, metrics, s.opt.optimizer.param_groups[0]["lr"]))
    if dist.is_main():
        state = checkpoint_dict(s, epoch=epoch, metrics=metrics)
        _check_finite(state, f"the end of epoch {epoch + 1}")
        write_metrics_csv(s.run_dir / "metrics.csv", s.history)
        # best.pt first: last.pt records this epoch (and its best fitness) as saved, so a kill between
        # the two writes must find best.pt already there; a resumed run redoes the epoch and rewrites both
        if is_best:
            ck.save_checkpoint(s.run_dir / "weights" / "best.pt", state)
        ck.save_checkpoint(s.last_pt, state)
        if s.cfg.plots:
            plot_curves(s.history, s.run_dir / "results.png", task.fitness, task.metric_names)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k in task.metric_names)
    s.log(f"epoch {epoch + 1}/{s.epochs}  train loss {train['train_loss']:.4f} | val {shown}  "
          f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - t0:.1f}s" + ("  *best*" if is_best else "")
          + (f"  {train['skipped_steps']} non-finite step(s) skipped" if train["skipped_steps"] else ""))


def _finish(s: _Session, interrupted: tuple[int, int, int] | None) -> RunResult:
    """After the epochs: the interruption raised, or the task's pictures, the report and the result."""
    cfg = s.cfg
    if interrupted is not None:
        dist.barrier()  # the others wait while rank 0 writes
        dist.cleanup(s.started_group)
        signum, epoch, step = interrupted
        raise TrainingInterrupted(signum, s.last_pt, cfg.task, epoch, step)
    if s.metrics and cfg.plots and dist.is_main():
        s.task.draw(s.metrics, s.run_dir, names=s.data.names)
    skipped = s.data.skipped
    if skipped:
        s.log(f"skipped {len(skipped)} bad image(s): " + "; ".join(f"{p} ({r})" for p, r in skipped[:10])
              + (" ..." if len(skipped) > 10 else ""))
    if cfg.plots and dist.is_main():
        from cnnkit.engine.report import write_report

        s.log(f"report: {write_report([s.run_dir], s.run_dir / 'report.html', device=cfg.device)}")
    if s.budget is not None:
        done = s.plan.describe() if s.plan is not None and s.plan.steps else f"{len(s.history)} epochs"
        s.log(f"time budget {cfg.time:g} min: {done}, {s.budget.used() / 60:.2f} min used")
    dist.barrier()  # the others wait while rank 0 writes
    dist.cleanup(s.started_group)
    return RunResult(s.run_dir, s.metrics, s.best, s.history)
