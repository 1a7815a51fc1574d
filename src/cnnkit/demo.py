"""`make demo`: every task that declares a demo (`Task.demo_minutes`), each trained with the defaults of
`cnnkit train TASK` to a time budget, evaluated on held-out images, used to predict files and drawn:

    classify  the default small VGG on the embedded Fashion-MNIST (runs/classify/demo)
    detect    the default YOLO on EfficientNet-Lite0 (ImageNet weights) on the built-in scenes (runs/detect/demo)
    segment   the default U-Net on EfficientNet-Lite0 (ImageNet weights) on scenes-seg (runs/segment/demo)

Each task trains to a time budget (`--time`, `cnnkit.engine.budget`) instead of a fixed number of epochs,
so the demo ends in about 25 minutes on any machine and a faster one (bf16, a GPU) trains more epochs.
The budget, the files predicted and the lines printed are each task's own (`demo_minutes`, `demo_predict`,
`demo_lines`); validating best.pt again and predicting files adds well under a minute in all, and the
closing page of all the runs about one.
"""

from __future__ import annotations

import time
from pathlib import Path

from cnnkit.taskapi import task_class, task_names


def demo_tasks() -> tuple[str, ...]:
    """The registered tasks that take part in `make demo`, in registration order."""
    return tuple(name for name in task_names() if task_class(name).demo_minutes > 0)


def __getattr__(name: str):
    # DEMO_TASKS and DEMO_MINUTES are read from the registry when asked for (tasks may be added after import)
    if name == "DEMO_TASKS":
        return demo_tasks()
    if name == "DEMO_MINUTES":
        return {t: task_class(t).demo_minutes for t in demo_tasks()}
    raise AttributeError(name)


def task_demo_config(task: str, quick: bool = False):
    """The CLI's defaults for `cnnkit train TASK`, run as the demo: its time budget, runs/TASK/demo."""
    from cnnkit.engine.config import TrainConfig

    cfg = TrainConfig.for_task(task, epochs=0, time=task_class(task).demo_minutes, name="demo", project="runs",
                               progress=False, exist_ok=False)
    if quick:  # a smoke run: one epoch (cut to the task's `demo_quick_steps` where an epoch is long)
        cfg.epochs, cfg.time, cfg.max_steps = 1, 0.0, task_class(task).demo_quick_steps
    return cfg


def demo_config(quick: bool = False):
    """The first demo task's config (`task_demo_config`)."""
    return task_demo_config(demo_tasks()[0], quick)


def run_demo(quick: bool = False, tasks=None) -> int:
    from cnnkit.engine.report import write_report

    run_dirs = [_run_task(task, quick) for task in (tasks or demo_tasks())]
    print()
    print(f"demo report (every run on one page): {write_report(run_dirs, Path('runs') / 'demo_report.html')}")
    return 0


def _run_task(task: str, quick: bool) -> Path:
    from cnnkit.engine.inference import load_trained, validate
    from cnnkit.engine.trainer import fit

    start = time.perf_counter()
    cfg = task_demo_config(task, quick)
    result = fit(cfg)
    minutes = (time.perf_counter() - start) / 60
    best = result.run_dir / "weights" / "best.pt"
    metrics = validate(best, out_dir=result.run_dir, log=lambda *_: None)
    trained = load_trained(best)
    trained.task.demo_predict(trained, result.run_dir, cfg)
    print()
    for line in trained.task.demo_lines(cfg, metrics, result.run_dir, len(result.history), minutes):
        print(line)
    return result.run_dir
