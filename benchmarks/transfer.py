"""Transfer learning: fine-tuning from ImageNet weights against training from scratch, same budget.

Both runs train the same architecture on the same data for the same number of epochs and evaluate on
held-out images; the only difference is the initial weights of the backbone. Prints mean +- std of
the final metric over the seeds and a Markdown row for the README.

    classify  a small stratified subset of the embedded Fashion-MNIST; top-1 on the 2,000 held-out images
    detect    the built-in scenes with the default detector (YOLO head on EfficientNet-Lite0); AP50 on
              the 300 held-out scenes
    segment   the built-in scenes-seg with the default segmenter (U-Net on EfficientNet-Lite0); mIoU on
              the 300 held-out scenes

Usage:

    python benchmarks/transfer.py [--task classify] [--model efficientnet_lite0] [--subset 500] [--epochs 15]
    python benchmarks/transfer.py --task detect --epochs 8 --seeds 0
    python benchmarks/transfer.py --task segment --epochs 5 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from cnnkit.cli import TASK_DEFAULTS
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trainer import fit


METRIC = {"classify": "val_top1", "detect": "val_AP50", "segment": "val_mIoU"}


def run(args, weights: str | None, seed: int, tmp: str) -> tuple[float, float]:
    if args.task == "classify":
        cfg = TrainConfig.for_task("classify", model=args.model, data="fashion-mnist", train_subset=args.subset,
                                   epochs=args.epochs, batch_size=args.batch_size, img_size=args.img_size,
                                   optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                                   warmup_epochs=1, weights=weights, seed=seed, project=tmp,
                                   name=f"{weights or 'scratch'}-{seed}", progress=False, plots=False)
    else:  # the CLI's default recipe for the task, with only the initial weights changed
        cfg = TrainConfig.for_task(args.task, epochs=args.epochs, weights=weights, seed=seed,
                                   project=args.keep or tmp, name=f"{weights or 'scratch'}-{seed}",
                                   progress=False, plots=bool(args.keep), exist_ok=True)
    t = time.perf_counter()
    result = fit(cfg, log=lambda *_: None)
    return float(result.history[-1][METRIC[args.task]]), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(METRIC), default="classify")
    ap.add_argument("--model", default="efficientnet_lite0", help="classify only (detect/segment: the CLI default)")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--subset", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", default="", help="detect/segment: keep the runs (with their pictures) under this folder")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in (args.weights, None):
            accs, secs = [], []
            for seed in args.seeds:
                acc, sec = run(args, weights, seed, tmp)
                accs.append(acc)
                secs.append(sec)
                print(f"{weights or 'scratch':>10s} seed {seed}: {METRIC[args.task][4:]} {acc:.4f} ({sec:.0f} s)", flush=True)
            rows[weights or "scratch"] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                          statistics.median(secs))
    pre, scratch = rows[args.weights], rows["scratch"]
    if args.task != "classify":
        d = TASK_DEFAULTS[args.task]
        model = f"{d['model']} on {d['model_kwargs']['backbone']} {d['config']['img_size']}px"
        data = "scenes, 4,000 train / 300 val" + (" (masks)" if args.task == "segment" else "")
        metric = METRIC[args.task][4:]
        print(f"\n{model}, {args.epochs} epochs, seeds {args.seeds}")
        print(f"| {args.task} ({metric}) | {data} | {model} | {pre[0]:.3f} ± {pre[1]:.3f} "
              f"| {scratch[0]:.3f} ± {scratch[1]:.3f} | {args.epochs} | {pre[2]:.0f} s |")
        return
    print(f"\n{args.model}, {args.subset} training images, {args.epochs} epochs at {args.img_size}px, "
          f"{args.optimizer} lr {args.lr}, seeds {args.seeds}")
    print("| task | data | model | from ImageNet | from scratch | epochs | time per run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| classify | Fashion-MNIST, {args.subset} train / 2,000 val | {args.model} {args.img_size}px "
          f"| {pre[0]:.2%} ± {pre[1]:.2%} | {scratch[0]:.2%} ± {scratch[1]:.2%} | {args.epochs} "
          f"| {pre[2]:.0f} s |")


if __name__ == "__main__":
    main()
