"""`make demo`: the three tasks on embedded data, each trained, evaluated on held-out images, used to
predict files and drawn:

    classify  the default small VGG on the embedded Fashion-MNIST (runs/classify/demo)
    detect    the default YOLO on EfficientNet-Lite0 (ImageNet weights) on the built-in scenes (runs/detect/demo)
    segment   the default U-Net on EfficientNet-Lite0 (ImageNet weights) on scenes-seg (runs/segment/demo)

Detection and segmentation use exactly `cnnkit train detect` / `cnnkit train segment` with their defaults.
Each task trains to a time budget (`--time`, `cnnkit.engine.budget`) instead of a fixed number of epochs,
so the demo ends in about 25 minutes on any machine and a faster one (bf16, a GPU) trains more epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

# minutes of `fit` per task (training, evaluations, pictures, report); validating best.pt again and
# predicting files adds well under a minute in all, and the closing page of all three runs about one
DEMO_MINUTES = {"classify": 4.5, "detect": 9.5, "segment": 9.5}


def demo_config(quick: bool = False):
    from cnnkit.engine.config import TrainConfig

    cfg = TrainConfig.for_task("classify", epochs=0, time=DEMO_MINUTES["classify"], name="demo", project="runs",
                               progress=False)
    if quick:
        cfg.epochs, cfg.time = 1, 0.0
    return cfg


DEMO_TASKS = ("classify", "detect", "segment")


def run_demo(quick: bool = False, tasks=DEMO_TASKS) -> int:
    from cnnkit.report import write_report

    run_dirs = [_classify(quick) if task == "classify" else _scenes_task(quick, task) for task in tasks]
    print()
    print(f"demo report (every run on one page): {write_report(run_dirs, Path('runs') / 'demo_report.html')}")
    return 0


def task_demo_config(task: str, quick: bool = False):
    """The CLI's defaults for `cnnkit train detect|segment`, run as the demo."""
    from cnnkit.engine.config import TrainConfig

    cfg = TrainConfig.for_task(task, epochs=0, time=DEMO_MINUTES[task])
    cfg.name, cfg.project, cfg.progress, cfg.exist_ok = "demo", "runs", False, False
    if quick:
        cfg.epochs, cfg.max_steps, cfg.time = 1, 2, 0.0
    return cfg


def _scenes_task(quick: bool, task: str) -> Path:
    from cnnkit.engine.inference import load_trained, validate
    from cnnkit.engine.trainer import fit

    start = time.perf_counter()
    cfg = task_demo_config(task, quick)
    result = fit(cfg)
    minutes = (time.perf_counter() - start) / 60
    best = result.run_dir / "weights" / "best.pt"
    metrics = validate(best, out_dir=result.run_dir, log=lambda *_: None)
    trained = load_trained(best)
    from cnnkit.data.scenes import ensure_scenes

    val_images = sorted((ensure_scenes() / "images" / "val").iterdir())[:8]
    trained.task.predict_paths(trained, val_images, out_dir=result.run_dir / "predict")
    backbone = cfg.model_kwargs.get("backbone", "")
    print()
    epochs = len(result.history)
    print(f"demo: {cfg.model} on {backbone} ({cfg.weights or 'scratch'}) trained {epochs} epoch{'s' * (epochs != 1)} on "
          f"the built-in {cfg.data} in {minutes:.1f} min{_budget(cfg)}")
    if task == "detect":
        print(f"      held-out 300 scenes: AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f}, "
              f"VOC07 AP50 {metrics['mAP50_voc07']:.3f}")
        print(f"      {result.run_dir}/pr_curve.png, val_predictions.png, predict/images/")
    else:
        print(f"      held-out 300 scenes: mIoU {metrics['mIoU']:.3f}, pixel accuracy {metrics['pixel_accuracy']:.3f}")
        print(f"      {result.run_dir}/confusion_matrix.png, val_predictions.png, predict/overlays/")
    return result.run_dir


def _classify(quick: bool) -> Path:
    from cnnkit.engine.inference import validate
    from cnnkit.engine.trainer import fit

    start = time.perf_counter()
    cfg = demo_config(quick)
    result = fit(cfg)
    minutes = (time.perf_counter() - start) / 60
    best = result.run_dir / "weights" / "best.pt"
    metrics = validate(best, out_dir=result.run_dir, log=lambda *_: None)
    samples = _write_samples(result.run_dir / "samples", cfg.data, n=32)
    from cnnkit.engine.inference import load_trained

    trained = load_trained(best)
    trained.task.predict_paths(trained, [samples], out_dir=result.run_dir / "predict", top_k=3)
    print()
    print(f"demo: {cfg.model} (width {cfg.model_kwargs['width']}) trained {len(result.history)} epochs on "
          f"8,000 Fashion-MNIST images in {minutes:.1f} min{_budget(cfg)}")
    print(f"      held-out 2,000 images: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}")
    print(f"      {result.run_dir}/metrics.csv, results.png, confusion_matrix.png, predict/predictions.png")
    return result.run_dir


def _budget(cfg) -> str:
    return f" (budget {cfg.time:g} min)" if cfg.time else ""


def _write_samples(folder: Path, data: str, n: int) -> Path:
    """Save the first n validation images as PNG files, so prediction runs on real files."""
    from PIL import Image

    from cnnkit.data import load_classification_data

    d = load_classification_data(data)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(n, len(d.val))):
        img, label = d.val[i]
        Image.fromarray(img.squeeze(0).numpy()).save(folder / f"{i:03d}_{d.names[label].replace('/', '-')}.png")
    return folder
