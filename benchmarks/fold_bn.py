"""BatchNorm folded into the convolution before it (`cnnkit.engine.fold`): what it buys at inference, and
what it costs in each precision.

speed (no checkpoint needed)
  For each task's default model at its `cnnkit predict` batch: forward passes of
    plain        fp32, NCHW, BatchNorm kept (what a plain PyTorch loop runs)
    cl           fp32, channels_last
    cl+fold      fp32, channels_last, BatchNorm folded
    bf16 cl      bf16 autocast, channels_last              (only where oneDNN has bf16 kernels)
    bf16 cl+fold bf16 autocast, channels_last, BatchNorm folded
  timed in turns in one process, `--rounds` rounds; each cell is the median over the rounds of the
  variant's speed against plain in the same round (each variant's time in a round: the fastest of
  `--reps` passes after one warm-up).
accuracy (`--weights best.pt ...`)
  `cnnkit val` of each checkpoint on its own validation split in fp32 and bf16 (where available), BatchNorm
  kept and folded, and the relative RMS change of the model's outputs on one validation batch against fp32
  with BatchNorm kept.

    python benchmarks/fold_bn.py [--task detect segment classify] [--rounds 4]
    python benchmarks/fold_bn.py --skip-speed --weights runs/detect/demo/weights/best.pt ...

Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402  (the cases and machine line of `make bench`)

from cnnkit.engine.device import cpu_supports_bf16, fp32_depthwise, resolve_precision  # noqa: E402
from cnnkit.engine.fold import fold_batchnorm  # noqa: E402

CPU = torch.device("cpu")


def _model(name: str):
    """The default model of a `make bench` case as `cnnkit train` builds it (ImageNet weights included)."""
    from cnnkit.taskapi import TaskData, get_task

    with contextlib.redirect_stdout(sys.stderr):
        with tempfile.TemporaryDirectory() as tmp:
            cfg, _ = speed._config(speed.CASES[name], "cpu", 1, tmp)
        task = get_task(cfg.task)
        shape = speed._input_shape(name, cfg)
        meta = {"channels": shape[0]}
        names = [f"class{i}" for i in range(10 if cfg.task == "classify" else 4)]
        model = task.build_model(cfg, TaskData(None, None, names, meta=meta))
    return model.eval(), shape, speed.CASES[name].infer_batch


def _variants(model, example, bf16: bool) -> dict:
    """name -> (module, channels_last, autocast dtype or None)."""
    folded = fold_batchnorm(model, example).model
    out = {"plain": (model, False, None),
           "cl": (copy.deepcopy(model).to(memory_format=torch.channels_last), True, None),
           "cl+fold": (copy.deepcopy(folded).to(memory_format=torch.channels_last), True, None)}
    if bf16:
        prec = resolve_precision("bf16", CPU)
        for label, m in (("bf16 cl", model), ("bf16 cl+fold", folded)):
            m = copy.deepcopy(m).to(memory_format=torch.channels_last)
            fp32_depthwise(m, CPU, prec)  # as cnnkit places it (forward-only: depthwise stays bf16)
            out[label] = (m, True, torch.bfloat16)
    return out


def speed_table(tasks: list[str], rounds: int, reps: int) -> str:
    bf16 = cpu_supports_bf16()
    rows, labels = {}, None
    for name in tasks:
        model, shape, batch = _model(name)
        x = torch.rand(batch, *shape)
        variants = _variants(model, x[:2], bf16)
        labels = list(variants)
        ratios: dict[str, list[float]] = {k: [] for k in variants}
        plain_ips = []
        for _ in range(rounds):
            times = {}
            for label, (m, cl, dtype) in variants.items():
                xi = x.contiguous(memory_format=torch.channels_last) if cl else x
                best = float("inf")
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                            enabled=dtype is not None):
                    for i in range(reps + 1):
                        t0 = time.perf_counter()
                        m(xi)
                        if i:
                            best = min(best, time.perf_counter() - t0)
                times[label] = best
            plain_ips.append(batch / times["plain"])
            for label in variants:
                ratios[label].append(times["plain"] / times[label])
        rows[name] = (batch, statistics.median(plain_ips), {k: statistics.median(v) for k, v in ratios.items()})
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rows[name][2].items()), flush=True)
    head = "| model (batch) | plain img/s | " + " | ".join(labels[1:]) + " |"
    lines = [head, "|---|---|" + "---|" * (len(labels) - 1)]
    for name, (batch, ips, r) in rows.items():
        lines.append(f"| {speed.CASES[name].label} ({batch}) | {ips:.0f} | "
                     + " | ".join(f"{r[k]:.2f}x" for k in labels[1:]) + " |")
    return "\n".join(lines)


def _outputs_change(weights: str) -> dict:
    """Relative RMS change of the outputs on one validation batch, against fp32 with BatchNorm kept."""
    from cnnkit.engine.inference import load_trained, validation_loader

    ref = load_trained(weights, precision="fp32", channels_last="on", fold_bn="off")
    loader, _ = validation_loader(ref, None, 32, 0)
    images, _ = next(iter(loader))

    def first(o):
        return (o[0] if isinstance(o, (tuple, list)) else o).float()

    with torch.inference_mode():
        r = first(ref.model(ref.run.inputs(images, ref.task)))
    out = {}
    for prec in (["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]):
        for fold in ("off", "on"):
            t = load_trained(weights, precision=prec, channels_last="on", fold_bn=fold)
            with torch.inference_mode(), t.run.autocast():
                o = first(t.model(t.run.inputs(images, t.task)))
            out[prec, fold] = float((o - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt())
    return out


def accuracy_table(weights: list[str]) -> str:
    from cnnkit.engine.inference import validate

    precs = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    lines = ["| checkpoint | metric | " + " | ".join(f"{p}, BN {f}" for p in precs for f in ("kept", "folded"))
             + " | output change, " + " / ".join(f"{p} folded" for p in precs) + " |",
             "|---|---|" + "---|" * (2 * len(precs) + 1)]
    for w in weights:
        cells, metric = [], None
        for prec in precs:
            for fold in ("off", "on"):
                m = validate(w, precision=prec, channels_last="on", fold_bn=fold, workers=0, log=lambda *_: None)
                metric = metric or next(k for k in ("AP50", "mIoU", "top1") if k in m)
                cells.append(f"{m[metric]:.4f}")
        change = _outputs_change(w)
        label = str(Path(w).resolve().parent.parent)  # the run folder
        lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " | "
                     + " / ".join(f"{change[p, 'on']:.2g} (kept: {change[p, 'off']:.2g})" for p in precs) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", nargs="+", default=["classify", "detect", "segment", "vgg"], choices=list(speed.CASES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--weights", nargs="*", default=[], help="checkpoints for the accuracy table")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {speed.machine_line('cpu')}", flush=True)
    if not args.skip_speed:
        print(speed_table(args.task, args.rounds, args.reps), flush=True)
    if args.weights:
        print(accuracy_table(args.weights), flush=True)


if __name__ == "__main__":
    main()
