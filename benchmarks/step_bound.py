"""How close cnnkit's training step is to the bare model step, and what that bounds: the plain loop,
cnnkit's whole training step and the bare model step (forward, loss, backward and optimizer step on one
prepared batch held in memory: no data loading, no augmentation, no EMA, no logging) of a task's default,
timed in one process, in turns, `--rounds` rounds.

cnnkit / plain cannot exceed bare / plain by much: what cnnkit adds on top of the bare step (its loader,
batch augmentation, EMA, bookkeeping) only costs. If cnnkit's step is already near the bare step, the
remaining gap to a target is the model's own arithmetic in that number format.

    python benchmarks/step_bound.py --task classify segment [--rounds 2]

Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402


def bare_ips(name: str, steps: int, warmup: int) -> tuple[float, str]:
    """Images/s of the bare model step with cnnkit's own model, settings and optimizer."""
    import torch.nn.functional as F

    import cnnkit.engine.trainer as trainer
    from cnnkit.engine.finetune import train_mode

    case = speed.CASES[name]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg, explicit = speed._config(case, "cpu", steps + warmup, tmp)
        s = trainer._prepare(cfg, resume=None, explicit_model=explicit, extend_epochs=None, log=lambda *_: None)
        trainer._build_training(s)
        fold = trainer._fold_frozen_layers(s)  # as `fit` does: in fp32 runs with frozen early layers
    model, task, run, opt = s.model, s.task, s.run, s.opt.optimizer
    images, targets = next(iter(s.train_loader))
    x, y = run.inputs(images, task), task.move_targets(targets, run.device)
    train_mode(model)
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        with run.autocast():
            if cfg.task == "classify":  # cross-entropy only: the batch augmentation in ClassifyTask.loss is data work
                loss = F.cross_entropy(model(x), y)
            else:
                loss, _ = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if fold is not None:
        fold.undo()
    return s.batch / statistics.median(times), s.choice.describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", nargs="+", default=["classify", "segment"], choices=list(speed.CASES))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {speed.machine_line('cpu')}", flush=True)
    for name in args.task:
        case = speed.CASES[name]
        spec = {"case": name, "device": "cpu", "threads": torch.get_num_threads(),
                **speed._scaled(case, types.SimpleNamespace(steps=None, warmup=None))}
        rows = {"plain": [], "cnnkit": [], "bare": []}
        for _ in range(args.rounds):
            rows["plain"].append(speed.worker_plain(case, spec)["train_ips"])
            rows["cnnkit"].append(speed.worker_cnnkit(case, spec)["train_ips"])
            ips, settings = bare_ips(name, spec["steps"], spec["warmup"])
            rows["bare"].append(ips)
            print(f"{name}: plain {rows['plain'][-1]:.1f}, cnnkit {rows['cnnkit'][-1]:.1f}, bare {ips:.1f} img/s "
                  f"({settings})", flush=True)
        r = {k: statistics.median(v) for k, v in rows.items()}
        print(f"| {case.label} | {r['plain']:.1f} | {r['cnnkit']:.1f} | {r['bare']:.1f} | "
              f"{r['cnnkit'] / r['plain']:.2f}x | {r['bare'] / r['plain']:.2f}x | {r['cnnkit'] / r['bare']:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
