"""`make demo`: train the default small VGG on the embedded Fashion-MNIST, evaluate, predict, draw."""

from __future__ import annotations

import time
from pathlib import Path

DEMO_EPOCHS = 35


def demo_config(quick: bool = False):
    from cnnkit.engine.config import TrainConfig

    return TrainConfig(task="classify", model="vgg11_bn", model_kwargs={"width": 0.5, "pool_size": 1, "dropout": 0.2},
                       data="fashion-mnist", epochs=1 if quick else DEMO_EPOCHS, batch_size=64, img_size=32,
                       lr=0.05, name="demo", project="runs", progress=False)


def run_demo(quick: bool = False) -> int:
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
    print(f"demo: {cfg.model} (width {cfg.model_kwargs['width']}) trained {cfg.epochs} epochs on "
          f"8,000 Fashion-MNIST images in {minutes:.1f} min")
    print(f"      held-out 2,000 images: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}")
    print(f"      {result.run_dir}/metrics.csv, results.png, confusion_matrix.png, predict/predictions.png")
    return 0


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
