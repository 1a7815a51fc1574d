"""`fit`: a whole training run, resumable, writing everything under `runs/<task>/<name>/`.

Layout of a run: config.yaml, metrics.csv, results.png (curves), weights/last.pt (every epoch),
weights/best.pt (best validation fitness), plus what the task draws after the final evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

import cnnkit
from cnnkit.engine import checkpoint as ck
from cnnkit.engine import distributed as dist
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.finetune import backbone_parameters, freeze_early, is_frozen_at, set_backbone_frozen, train_mode
from cnnkit.engine.budget import PLAN_AFTER_STEPS, Budget, BudgetPlan, check_minutes
from cnnkit.engine.device import auto_workers, fp32_depthwise, resolve_device
from cnnkit.engine.probe import Choice, choose, model_id
from cnnkit.engine.loop import DivergedError, StopRequest, TrainingInterrupted, evaluate, to_device, train_one_epoch
from cnnkit.engine.optim import ModelEMA, build_optimizer, build_scheduler, default_steps, parameter_groups
from cnnkit.errors import UsageError, WeightsError


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    best_fitness: float
    history: list[dict[str, Any]]


def get_task(name: str):
    from cnnkit.tasks import get_task as _get
    return _get(name)


def new_run_dir(project: str | Path, task: str, name: str, exist_ok: bool) -> Path:
    """runs/<task>/<name>, or <name>2, <name>3 ... when it exists (nothing of an earlier run is overwritten)."""
    base = Path(project) / task
    path = base / name
    if exist_ok:
        return path
    i = 2
    while path.exists():
        path = base / f"{name}{i}"
        i += 1
    return path


def make_loader(dataset, cfg: TrainConfig, *, shuffle: bool, collate_fn, in_memory: bool,
                device: torch.device, batch_size: int | None = None, sampler=None) -> DataLoader:
    """A training loader (shuffle=True) drops its last partial batch when the data holds more than one
    global batch; `sampler` (its order, this process's shard) replaces the loader's own shuffling."""
    workers = auto_workers(in_memory, device) if cfg.workers < 0 else cfg.workers
    return DataLoader(dataset, batch_size=batch_size or cfg.batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      drop_last=shuffle and len(dataset) > cfg.batch_size, pin_memory=device.type == "cuda")


def checkpoint_dict(cfg: TrainConfig, task, model, data, *, optimizer, scheduler, ema, epoch: int,
                    best_fitness: float, metrics: dict[str, Any], scaler=None) -> dict[str, Any]:
    ema_model = ema.module if ema is not None else model
    return {
        "version": cnnkit.__version__,
        "task": task.name,
        "model": {"name": model.cnnkit_name, "kwargs": dict(model.cnnkit_kwargs)},
        "names": list(data.names),
        "preprocess": dict(data.meta),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items()},
        "train_state_dict": ({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                             if ema is not None else None),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_fitness": best_fitness,
        "config": cfg.to_dict(),
        "rng": ck.rng_state(),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
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


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    ck.atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v: str):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def plot_curves(rows: list[dict[str, Any]], path: Path, fitness: str, metric_names=()) -> None:
    """Loss curves and the task's validation-metric curves, one PNG (atomic)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    loss_keys = [k for k in rows[-1] if k.startswith("train_") or k == "val_loss"]
    metric_keys = [f"val_{m}" for m in metric_names if m != "loss" and f"val_{m}" in rows[-1]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in loss_keys:
        axes[0].plot(epochs, [r.get(k) for r in rows], marker=".", label=k)
    axes[0].set(title="loss", xlabel="epoch")
    for k in metric_keys:
        axes[1].plot(epochs, [r.get(k) for r in rows], marker=".", label=k, lw=2.5 if k == f"val_{fitness}" else 1.2)
    axes[1].set(title="validation", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with ck.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


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
        with precision.autocast():
            loss, _ = task.loss(m, to_device(images, task, device, channels_last), task.move_targets(targets, device))
        loss.backward()
        for p in m.parameters():
            p.grad = None

    choice = None
    if dist.is_main():
        choice = choose(model, device=device, precision=cfg.precision, channels_last=cfg.channels_last,
                        model_id=model_id(model, cfg.task), shape=(batch, *_sample_shape(data.train[0])),
                        step=step, kind="train", log=log)
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
        return _fit(cfg, resume=resume, explicit_model=explicit_model, extend_epochs=extend_epochs, log=log,
                    on_step=on_step, stop=stop)


def _fit(cfg: TrainConfig, *, resume, explicit_model, extend_epochs, log, on_step, stop: StopRequest) -> RunResult:
    ckpt = None
    if resume:
        ckpt = _load_resume(resume, cfg, explicit_model)
        cfg = TrainConfig.from_dict(ckpt["config"])
        if extend_epochs:
            cfg.epochs = extend_epochs
        run_dir = Path(resume).resolve().parent.parent
    else:
        run_dir = new_run_dir(cfg.project, cfg.task, cfg.name, cfg.exist_ok)
    task = get_task(cfg.task)
    device, started_group = dist.setup(resolve_device(cfg.device))
    if device.type == "cuda":  # fixed input sizes: let cuDNN time its algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
    run_dir = dist.broadcast_object(run_dir)  # rank 0 chose the (numbered) folder
    if not dist.is_main():
        log = _silent
    if cfg.time:
        check_minutes(cfg.time)
    if (cfg.epochs < 1 and not cfg.time) or cfg.epochs < 0 or cfg.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1 (--epochs 0 only with --time)")
    budget = Budget(cfg.time * 60, used_before=float((ckpt or {}).get("time_used_s") or 0.0),
                    max_epochs=cfg.epochs) if cfg.time else None
    batch = dist.per_process_batch(cfg.batch_size)
    ck.seed_everything(cfg.seed)  # the same initial weights in every process (DDP broadcasts rank 0's anyway)

    with dist.main_first():  # a built-in data set is generated once, by rank 0
        data = task.build_data(cfg)
    # a resumed run rebuilds the architecture only: its own checkpoint holds the weights
    model = task.build_model(dataclasses.replace(cfg, weights=None) if ckpt is not None else cfg, data).to(device)
    saved_pre = (ckpt or {}).get("preprocess") or {}
    if "mean" in saved_pre and "std" in saved_pre:  # the input normalisation the run started with
        data.meta.update(mean=list(saved_pre["mean"]), std=list(saved_pre["std"]))
        task.configure(data.meta)
    if cfg.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    if cfg.freeze_early:
        n_early = freeze_early(model, cfg.freeze_early)
        log(f"backbone layers at stride <= {cfg.freeze_early} kept frozen ({n_early} tensors)")
    choice = choose_training_settings(cfg, task, model, data, device, batch, log)
    precision, channels_last = choice.precision, choice.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fp32_depthwise(model, device, precision)
    ck.seed_everything(cfg.seed + dist.rank())  # augmentation: a stream of its own in each process
    train_loader = make_loader(data.train, cfg, shuffle=True, collate_fn=data.collate_fn, in_memory=data.in_memory,
                               device=device, batch_size=batch, sampler=dist.train_sampler(data.train, cfg.seed))
    val_loader = make_loader(data.val, cfg, shuffle=False, collate_fn=data.collate_fn, in_memory=data.in_memory,
                             device=device, batch_size=batch * 2, sampler=dist.val_sampler(data.val))
    backbone = backbone_parameters(model) if (cfg.freeze_backbone or cfg.backbone_lr_scale != 1.0) else []
    groups = parameter_groups(model, cfg.weight_decay, cfg.lr, backbone=backbone,
                              backbone_lr_scale=cfg.backbone_lr_scale)
    optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum)
    iters = len(train_loader)
    # the epochs of this run: --epochs, or what a resumed --time run planned (a fresh one plans after its first steps)
    planned = 0 if extend_epochs else int((ckpt or {}).get("planned_epochs") or 0)
    epochs = planned or cfg.epochs or (1000 if budget else 1)  # a budget's provisional: a flat lr until it plans
    total = epochs * iters  # --max-steps stops early without changing the schedule
    steps = list(cfg.steps) or default_steps(epochs)
    scheduler = build_scheduler(optimizer, total_iters=total, warmup_iters=int(cfg.warmup_epochs * iters),
                                schedule=cfg.schedule, iters_per_epoch=iters, steps=steps, gamma=cfg.gamma)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None

    start_epoch, start_step, best, history = 0, 0, float("-inf"), []
    partial, resume_rng = None, None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["train_state_dict"] or ckpt["state_dict"])
        except RuntimeError as exc:
            raise WeightsError(f"checkpoint does not fit the model: {str(exc).splitlines()[0]}", path=resume) from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best = int(ckpt["epoch"]) + 1, float(ckpt["best_fitness"])
        start_step = int(ckpt.get("step") or 0)  # a checkpoint written on a signal, mid-epoch
        history = [r for r in read_metrics_csv(run_dir / "metrics.csv") if r.get("epoch", 0) <= start_epoch]
        if start_step:  # the epoch's start state (its loader draws its seed from it), then the step's
            ck.set_rng_state(ckpt["epoch_rng"])
            resume_rng, partial = ckpt["rng"], ckpt.get("partial")
        else:
            ck.set_rng_state(ckpt["rng"])  # rank 0's; the other processes draw from streams of their own
        if dist.rank() > 0:
            ck.seed_everything(dist.seed_for_process(cfg.seed, start_epoch))
            resume_rng = None
        if dist.is_main():
            _remove_stale_temp_files(run_dir)
        log(f"resuming {run_dir} at epoch {start_epoch + 1}/{epochs}"
            + (f", step {start_step + 1}/{iters}" if start_step else ""))
    elif dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=cfg.exist_ok)
        ck.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # the model that trains: DDP-wrapped under torchrun; `model` stays the bare one that is saved
    train_model = dist.wrap(model, device, find_unused_parameters=bool(cfg.freeze_backbone))
    if cfg.compile:  # the training forward/backward only; evaluation and checkpoints use the bare model
        train_model = torch.compile(train_model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.task}: {model.cnnkit_name} ({n_params:,} parameters) on {data.source}; device {device}, "
        f"{choice.describe()}, {train_loader.num_workers} workers"
        + (f", time budget {cfg.time:g} min ({budget.remaining() / 60:.1f} min left; "
           + (f"{planned} epochs planned)" if planned else f"epochs planned after the first {PLAN_AFTER_STEPS} steps)")
           if budget else "")
        + (f", {dist.world_size()} processes x {batch} images a step" if dist.world_size() > 1 else "")
        + f" -> {run_dir}")

    steps_done = start_epoch * iters + start_step
    metrics: dict[str, Any] = {}  # of this process's last evaluation (the task draws from it)
    saved_metrics = dict(ckpt.get("metrics") or {}) if ckpt is not None else {}
    interrupted: tuple[int, int, int] | None = None  # (signal, epoch, step within it)
    last_pt = run_dir / "weights" / "last.pt"
    plan = BudgetPlan(budget, scheduler, cfg, iters=iters, train_images=len(data.train), val_images=len(data.val),
                      planned=planned, log=log) if budget else None
    epoch = start_epoch
    while epoch < epochs:
        if cfg.max_steps and steps_done >= cfg.max_steps:
            break
        if cfg.freeze_backbone:
            frozen = is_frozen_at(epoch, cfg.freeze_backbone, cfg.unfreeze_at)
            if set_backbone_frozen(model, frozen) and (epoch > start_epoch or not frozen):
                log(f"epoch {epoch + 1}: backbone {'frozen' if frozen else 'unfrozen'}")
        t0 = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)  # the order of each epoch: seed + epoch, whatever the world size
        epoch_rng = ck.rng_state()  # saved with a mid-epoch checkpoint: the loader of this epoch starts from it
        first = epoch == start_epoch
        train = train_one_epoch(train_model, task, train_loader, optimizer, scheduler, precision, device=device,
                                channels_last=channels_last, scaler=scaler, ema=ema, clip_grad=cfg.clip_grad,
                                max_steps=(cfg.max_steps - steps_done) if cfg.max_steps else 0,
                                epoch=epoch, epochs=epochs, progress=cfg.progress and dist.is_main(),
                                on_step=plan.on_step(on_step, epoch) if plan else on_step, stop=stop,
                                skip_nonfinite=cfg.skip_nonfinite,
                                start_step=start_step if first else 0, resume_rng=resume_rng if first else None,
                                resume_totals=partial if first else None)
        steps_done += train["steps"]
        if plan and not plan.epochs and train["steps"] and train["interrupted_at"] is None:
            plan.plan(epoch, train["train_time_s"] / train["steps"], 0)  # fewer steps than the planning needs
        if train["interrupted_at"] is not None:  # a signal: save this step and stop
            interrupted = (stop.signum or signal.SIGTERM, epoch, train["interrupted_at"])
            if dist.is_main():
                state = checkpoint_dict(cfg, task, model, data, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                        epoch=epoch - 1, best_fitness=best, metrics=metrics or saved_metrics,
                                        scaler=scaler)
                state.update(step=train["interrupted_at"], epoch_rng=epoch_rng, partial=train["totals"])
                if plan:
                    state.update(plan.state())
                _save_if_finite(last_pt, state, f"epoch {epoch + 1}, step {train['interrupted_at']}")
            break
        eval_model = ema.module if ema is not None else model
        dist.broadcast_buffers(eval_model)  # every process evaluates the model rank 0 saves
        t_eval = time.perf_counter()
        metrics = evaluate(eval_model, task, val_loader, precision, device=device,
                           channels_last=channels_last, names=data.names)
        if plan:
            plan.end_epoch(epoch, train["train_time_s"], time.perf_counter() - t_eval, train["steps"])
            epochs = plan.epochs or epochs
        fitness = float(metrics[task.fitness])
        is_best = fitness > best
        best = max(best, fitness)
        row = _scalar_row(epoch + 1, train, metrics, optimizer.param_groups[0]["lr"])
        history.append(row)
        if dist.is_main():
            state = checkpoint_dict(cfg, task, model, data, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                    epoch=epoch, best_fitness=best, metrics=metrics, scaler=scaler)
            if plan:
                state.update(plan.state())
            _check_finite(state, f"the end of epoch {epoch + 1}")
            write_metrics_csv(run_dir / "metrics.csv", history)
            # best.pt first: last.pt records this epoch (and its best fitness) as saved, so a kill between
            # the two writes must find best.pt already there; a resumed run redoes the epoch and rewrites both
            if is_best:
                ck.save_checkpoint(run_dir / "weights" / "best.pt", state)
            ck.save_checkpoint(last_pt, state)
            if cfg.plots:
                plot_curves(history, run_dir / "results.png", task.fitness, task.metric_names)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k in task.metric_names)
        log(f"epoch {epoch + 1}/{epochs}  train loss {train['train_loss']:.4f} | val {shown}  "
            f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - t0:.1f}s" + ("  *best*" if is_best else "")
            + (f"  {train['skipped_steps']} non-finite step(s) skipped" if train["skipped_steps"] else ""))
        # a signal during evaluation or the saves: last.pt already holds this epoch (the same answer on every process)
        if dist.average([float(bool(stop.signum))], device)[0] > 0 and epoch + 1 < epochs:
            interrupted = (stop.signum or signal.SIGTERM, epoch + 1, 0)
            break
        epoch += 1
    if interrupted is not None:
        dist.barrier()  # the others wait while rank 0 writes
        dist.cleanup(started_group)
        signum, epoch, step = interrupted
        raise TrainingInterrupted(signum, last_pt, cfg.task, epoch, step)
    if metrics and cfg.plots and dist.is_main():
        task.draw(metrics, run_dir, names=data.names)
    if data.skipped:
        log(f"skipped {len(data.skipped)} bad image(s): " + "; ".join(f"{p} ({r})" for p, r in data.skipped[:10])
            + (" ..." if len(data.skipped) > 10 else ""))
    if cfg.plots and dist.is_main():
        from cnnkit.report import write_report

        log(f"report: {write_report([run_dir], run_dir / 'report.html', device=cfg.device)}")
    if budget is not None:
        log(f"time budget {cfg.time:g} min: {len(history)} epochs, {budget.used() / 60:.2f} min used")
    dist.barrier()  # the others wait while rank 0 writes
    dist.cleanup(started_group)
    return RunResult(run_dir, metrics, best, history)
