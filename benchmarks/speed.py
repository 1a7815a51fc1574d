"""Speed of cnnkit against plain PyTorch for each task's default model, in one run, as one table.

For every case (the defaults of `cnnkit train classify | detect | segment`, plus full-width vgg11_bn at
64 px for the FLOP-rate target) it measures, each variant in a subprocess of its own:

training images/s
  (a) plain: what a typical user writes: fp32, NCHW, eager, a default DataLoader (num_workers 0) with
      per-sample torchvision transforms on PIL images read from disk (classify: the decoded Fashion-MNIST
      arrays through PIL, as torchvision's FashionMNIST does), the same model (same ImageNet weights), the
      task's own loss, the same optimizer (torch's default implementation, one parameter group), the same
      gradient clipping, every layer trained, no EMA, no schedule;
  (b) cnnkit: `cnnkit.engine.trainer.fit` with the very config `cnnkit train <task>` builds (parsed by
      cnnkit's own CLI parser): precision and memory layout as `--precision auto --channels-last auto`
      measure them on this CPU (cnnkit.engine.probe; fp32 depthwise under bf16), bf16/fp16 AMP +
      channels_last on CUDA, freeze_early where the defaults set it, EMA where they
      set it, the engine's data pipeline and fused optimizer. Evaluation is switched off (training only).
  Each rate is the images of the timed steps over their time (step end to step end, after warm-up).
inference
  batch-1 latency and batched throughput of the model's forward pass on synthetic inputs (the model is
  what is measured), both in the cnnkit subprocess, in turns: plain = fp32, NCHW, eval, no_grad, the
  model as built; cnnkit = `cnnkit.engine.inference._place` of the same model (what `cnnkit predict`
  uses: precision and channels_last measured on forward passes at the batch size, and in fp32 BatchNorm
  folded into the convolutions) under the chosen autocast. Speed-ups: medians of the ratios within each process.
achieved GFLOP/s
  forward FLOPs = 2 x multiply-adds (`cnnkit.models.summary.summarize`, what `cnnkit info` prints);
  training FLOPs are counted per layer from what runs: forward 2 x MACs, plus 2 x MACs for the input
  gradient when the layer's input needs one, plus 2 x MACs for the weight gradient when its weight
  trains. With every layer trained that is ~3x forward (less the first layer's input gradient); the
  layers `freeze_early` keeps frozen, at the start of the network, run forward only.
  Rate against the machine's convolution peak, measured in the same run (the larger of a 3x3 and a
  1x1 convolution, fp32 and bf16).
peak memory
  CPU: the training subprocess's peak resident set (VmHWM of /proc/self/status: torch, the data the
  variant holds, activations); CUDA: torch.cuda.max_memory_allocated.
data pipeline
  images/s the engine's own training DataLoader delivers (augmentation included, no model), against
  the images/s cnnkit's training consumes.

Figures only: nothing here passes or fails on a timing.

    python benchmarks/speed.py --task all [--device cpu|cuda] [--steps N] [--repeats 3] [--write]
    python benchmarks/speed.py --task detect --profile        # where a cnnkit training step's time goes
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_RESULT "


@dataclass
class Case:
    """One column of the table: the `cnnkit train` arguments and how long to measure (full run)."""

    label: str
    argv: list[str]
    steps: int  # timed training steps
    warmup: int  # untimed steps first
    infer_batch: int  # batched inference (the `cnnkit predict` default batch of the task)
    latency_reps: int  # batch-1 forward passes timed
    batched_reps: int  # batched forward passes timed
    data_batches: int  # loader batches timed for the data-pipeline figure
    note: str = ""


CASES: dict[str, Case] = {
    "classify": Case("classify", ["train", "classify"], steps=100, warmup=8, infer_batch=64,
                     latency_reps=60, batched_reps=12, data_batches=40),
    "detect": Case("detect", ["train", "detect"], steps=20, warmup=3, infer_batch=16,
                   latency_reps=20, batched_reps=6, data_batches=12),
    "segment": Case("segment", ["train", "segment"], steps=28, warmup=3, infer_batch=16,
                    latency_reps=15, batched_reps=5, data_batches=20),
    # the FLOP-rate row: full-width VGG convolutions; pool_size 1 (as the demo's model) keeps the classifier
    # small, so the convolutions hold 97% of the multiply-adds (and a checkpoint stays 0.1 GB, not 0.5 GB)
    "vgg": Case("VGG (FLOP rate)", ["train", "classify", "--model", "vgg11_bn", "--width", "1", "--pool-size", "1",
                                    "--img-size", "64"],
                steps=12, warmup=3, infer_batch=64, latency_reps=20, batched_reps=4, data_batches=20,
                note="FLOP-rate target"),
}
ALL = ("classify", "detect", "segment", "vgg")


# ---------------------------------------------------------------------------------------------- machine

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_description() -> dict:
    info = _read("/proc/cpuinfo")
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    mem = next((ln.split()[1] for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), "0")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "mem_gib": round(int(mem) / 2**20, 1),
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx512_vnni"})}


def machine_line(device: str) -> str:
    import torch

    from cnnkit.engine.device import cpu_supports_bf16

    c = cpu_description()
    parts = [f"{c['cpu']}, {c['cores']} cores available, {c['mem_gib']} GiB",
             f"CPU flags {', '.join(c['bf16_flags']) or 'none of avx512f/avx512_bf16/amx'}"
             f" (oneDNN bf16: {'yes' if cpu_supports_bf16() else 'no'})"
             + "".join(f", {k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ),
             f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
             f"Python {platform.python_version()}"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        parts.insert(0, f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- peaks

def conv_peak(dtype, device: str, kernel: int) -> float:
    """GFLOP/s of one large convolution's forward pass: 256->256 3x3 on 28x28 maps, or 1024->1024 1x1
    on 28x28 maps (batch 32 on a CPU, 256 on CUDA); channels_last, autocast to `dtype` (None = fp32)."""
    import torch

    batch, reps = (256, 30) if device == "cuda" else (32, 8)
    ch = 256 if kernel == 3 else 1024
    conv = torch.nn.Conv2d(ch, ch, kernel, padding=kernel // 2, bias=False).to(device)
    x = torch.randn(batch, ch, 28, 28, device=device)
    conv = conv.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    flops = 2 * ch * ch * kernel * kernel * 28 * 28 * batch
    times = []
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the peak: the best algorithm the library has
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(reps + 3):
                _sync(device)
                t = time.perf_counter()
                conv(x)
                _sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - t)
    finally:
        torch.backends.cudnn.benchmark = old
    return flops / statistics.median(times) / 1e9


def has_bf16(device: str) -> bool:
    """Whether bf16 convolutions have kernels of their own here (on a CPU: oneDNN's AVX512-BF16 / AMX)."""
    import torch

    from cnnkit.engine.device import cpu_supports_bf16

    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()


def machine_key(device: str) -> str:
    """The BENCHMARKS.md section of this kind of machine: cpu-amx-bf16 (bf16 matrix tiles as well as
    AVX-512 BF16, unless ONEDNN_MAX_CPU_ISA holds oneDNN below AMX), cpu-avx512-bf16, cpu-avx2 or cuda."""
    if device == "cuda":
        return "cuda"
    if not has_bf16(device):
        return "cpu-avx2"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    amx = "amx_bf16" in cpu_description()["bf16_flags"] and (isa == "ALL" or "AMX" in isa)
    return "cpu-amx-bf16" if amx else "cpu-avx512-bf16"


def measure_peaks(device: str) -> dict:
    """Convolution peaks in GFLOP/s; bf16 is None where it has no kernels of its own (it would only
    measure an emulation)."""
    import torch

    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for k in (3, 1):
            out[f"{name}_{k}x{k}"] = conv_peak(dtype, device, k) if name == "fp32" or has_bf16(device) else None
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- memory

def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- FLOPs

def training_flops(model, input_shape: tuple[int, int, int], device) -> dict:
    """Forward MACs (as `cnnkit info` counts them) and the FLOPs one training image costs, counted per
    layer from what autograd will run: forward 2 MACs, input gradient 2 MACs where the layer's input
    requires grad, weight gradient 2 MACs where its weight trains."""
    import torch

    from cnnkit.models.summary import _CONV, _CONV_TRANSPOSE, _macs, summarize

    rows = []

    def hook(module, inputs, output):
        x = inputs[0] if inputs else None
        w = getattr(module, "weight", None)
        rows.append((_macs(module, inputs, output), bool(x is not None and x.requires_grad),
                     bool(w is not None and w.requires_grad)))

    kinds = (*_CONV, *_CONV_TRANSPOSE, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    fwd_macs = summarize(model, input_shape).macs
    hooked = sum(r[0] for r in rows)
    train = sum(2 * m * (1 + gi + gw) for m, gi, gw in rows)
    frozen = sum(m for m, _gi, gw in rows if not gw)
    return {"fwd_macs": fwd_macs, "hooked_macs": hooked, "train_flops": train,
            "frozen_macs_share": frozen / max(1, hooked)}


# ---------------------------------------------------------------------------------------------- workers

def _config(case: Case, device: str, steps: int, project: str):
    from cnnkit.cli import build_parser, config_from_args

    argv = case.argv + ["--device", device, "--no-progress", "--project", project, "--name", "bench",
                        "--max-steps", str(steps)]
    args = build_parser().parse_args(argv)
    cfg, explicit = config_from_args(args.task, args)
    cfg.plots = False  # no pictures or report after the run (nothing timed depends on them)
    return cfg, explicit


def _rate(stamps: list[tuple[float, int]], warmup: int, batch: int) -> tuple[float, int]:
    """Images/s over the steps after `warmup`, step end to step end; an interval that spans an epoch
    boundary (the engine evaluates and saves there) is left out."""
    span, n = 0.0, 0
    for (t0, e0), (t1, e1) in zip(stamps[warmup - 1:], stamps[warmup:]):
        if e0 == e1:
            span += t1 - t0
            n += 1
    return (n * batch / span if span else float("nan")), n


def _input_shape(case_name: str, cfg) -> tuple[int, int, int]:
    channels = 1 if cfg.task == "classify" and cfg.data == "fashion-mnist" else 3
    return (channels, cfg.img_size, cfg.img_size)


def _inference(model, shape, batch: int, device: str, ctx, channels_last: bool, reps1: int, repsb: int) -> dict:
    """Median batch-1 latency (ms) and batched throughput (images/s) of model(x) under `ctx`."""
    import torch

    def make(n):
        x = torch.rand((n, *shape), device=device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def timed(x, reps, warm):
        out = []
        with torch.no_grad(), ctx():
            for i in range(reps + warm):
                _sync(device)
                t = time.perf_counter()
                model(x)
                _sync(device)
                if i >= warm:
                    out.append(time.perf_counter() - t)
        return statistics.median(out)

    t1 = timed(make(1), reps1, 3)
    tb = timed(make(batch), repsb, 2)
    return {"latency_ms": t1 * 1e3, "batched_ips": batch / tb}


def _inference_pair(plain, placed, shape, batch: int, device: str, ctx, channels_last: bool, reps1: int,
                    repsb: int, rounds: int = 2) -> dict:
    """Inference of the plain model (fp32, NCHW, no autocast) and of cnnkit's placed copy of it, timed in
    the same process in turns (plain, cnnkit, plain, cnnkit, ...), so that a change in the machine's load
    touches both: medians over the rounds, and the speed-ups as medians of each round's ratio."""
    runs: dict[str, list[dict]] = {"plain": [], "cnnkit": []}
    for _ in range(rounds):
        runs["plain"].append(_inference(plain, shape, batch, device, contextlib.nullcontext, False,
                                        max(3, reps1 // rounds), max(2, repsb // rounds)))
        runs["cnnkit"].append(_inference(placed, shape, batch, device, ctx, channels_last,
                                         max(3, reps1 // rounds), max(2, repsb // rounds)))
    out = {}
    for who, rows in runs.items():
        prefix = "" if who == "cnnkit" else "plain_"
        out[prefix + "latency_ms"] = statistics.median(r["latency_ms"] for r in rows)
        out[prefix + "batched_ips"] = statistics.median(r["batched_ips"] for r in rows)
    pairs = list(zip(runs["plain"], runs["cnnkit"]))
    out["latency_ratio"] = statistics.median(p["latency_ms"] / c["latency_ms"] for p, c in pairs)
    out["batched_ratio"] = statistics.median(c["batched_ips"] / p["batched_ips"] for p, c in pairs)
    return out


def _data_rate(loader, batches: int) -> float:
    """Images/s the loader delivers (first batch untimed)."""
    it = iter(loader)
    next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _targets = next(it)
        except StopIteration:
            break
        n += images.shape[0]
    return n / (time.perf_counter() - t)


def worker_cnnkit(case: Case, spec: dict) -> dict:
    import torch

    import cnnkit.engine.trainer as trainer
    from cnnkit.engine.device import resolve_device
    from cnnkit.engine.inference import _place
    from cnnkit.engine.probe import ProbeRequest
    from cnnkit.models import build_model

    device, steps, warmup = spec["device"], spec["steps"], spec["warmup"]
    captured: dict = {}
    real_epoch = trainer.train_one_epoch

    def train_one_epoch(model, task, loader, *a, **k):
        captured.setdefault("model", model)
        captured.setdefault("task", task)
        captured.setdefault("loader", loader)
        run = a[1] if len(a) > 1 else k.get("run")  # train_one_epoch(model, task, loader, opt, run, plan)
        captured.setdefault("precision", run.precision)
        captured.setdefault("channels_last", run.channels_last)
        return real_epoch(model, task, loader, *a, **k)

    stamps: list[tuple[float, int]] = []

    def on_step(epoch, step, loss):
        _sync(device)
        stamps.append((time.perf_counter(), epoch))

    trainer.train_one_epoch = train_one_epoch
    trainer.evaluate = lambda *a, **k: collections.defaultdict(float)  # time training only
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg, explicit = _config(case, device, warmup + steps, tmp)
        trainer.fit(cfg, explicit_model=explicit, log=lambda *_: None, on_step=on_step)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    ips, timed = _rate(stamps, warmup, cfg.batch_size)
    model, loader, prec = captured["model"], captured["loader"], captured["precision"]
    shape = _input_shape(spec["case"], cfg)
    flops = training_flops(model, shape, torch.device(device))
    data_ips = _data_rate(loader, spec["data_batches"])
    fresh = build_model(model.cnnkit_name, **dict(model.cnnkit_kwargs))
    plain = copy.deepcopy(fresh).to(device).eval()  # what the plain loop would run: fp32, NCHW, BatchNorm kept
    request = ProbeRequest(resolve_device(device), "auto", "auto", "", (spec["infer_batch"], *shape), kind="infer")
    fresh, placed = _place(fresh, captured["task"], request, None)
    iprec, cl = placed.precision, placed.channels_last
    infer = _inference_pair(plain, fresh, shape, spec["infer_batch"], device, iprec.autocast, cl,
                            spec["latency_reps"], spec["batched_reps"])
    return {"train_ips": ips, "timed_steps": timed, "batch": cfg.batch_size, "peak_mib": peak,
            "data_ips": data_ips, "workers": loader.num_workers, **flops, **infer,
            "precision": prec.name, "channels_last": bool(captured["channels_last"]),
            "freeze_early": cfg.freeze_early, "ema": cfg.ema, "infer_precision": iprec.name,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "model_name": model.cnnkit_name, "model_kwargs": dict(model.cnnkit_kwargs), "img_size": cfg.img_size}


# -- plain PyTorch, written the way the torchvision tutorials do ----------------------------------------

def _plain_classify(cfg):
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms as T

    from cnnkit.data import load_classification_data

    data = load_classification_data(cfg.data)
    side = max(data.train[0][0].shape[-2:])
    s = cfg.img_size
    fit = [T.Pad((s - side) // 2)] if side >= 0.75 * s else [T.Resize(s), T.CenterCrop(s)]
    tf = T.Compose([*fit, T.RandomCrop(s, padding=max(1, s // 8)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.5,) * data.channels, (0.25,) * data.channels),
                    T.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0)])

    class PilDataset(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            img, label = self.base[i]
            return tf(Image.fromarray(img.squeeze(0).numpy())), label

    base = data.train
    base.transform = None
    meta = {"img_size": s, "channels": data.channels, "mean": [0.5] * data.channels, "std": [0.25] * data.channels}
    return PilDataset(base), list(data.names), meta, None


def _plain_detect(cfg):
    import torch
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from cnnkit.data.formats import read_yolo
    from cnnkit.data.scenes import ensure_scenes

    splits = read_yolo(ensure_scenes() / "data.yaml")
    s = cfg.img_size
    tf = v2.Compose([v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2)),
                     v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
                     v2.RandomHorizontalFlip(), v2.Resize((s, s), antialias=True), v2.ClampBoundingBoxes(),
                     v2.SanitizeBoundingBoxes(min_size=2.0), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    class Scenes(Dataset):
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            r = self.records[i]
            img = Image.open(r.image_path).convert("RGB")
            boxes = tv_tensors.BoundingBoxes(r.boxes.float(), format="XYXY", canvas_size=(img.height, img.width))
            return tf(img, {"boxes": boxes, "labels": r.labels.clone()})

    def collate(batch):
        return torch.stack([im for im, _ in batch]), [t for _, t in batch]

    meta = {"img_size": s, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
    return Scenes(splits.splits["train"]), list(splits.names), meta, collate


def _plain_segment(cfg):
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from cnnkit.data.scenes import ensure_scenes, segmentation_names

    root = ensure_scenes()
    images = sorted((root / "images" / "train").glob("*.jpg"))
    s = cfg.img_size
    tf = v2.Compose([v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2),
                                     fill={tv_tensors.Mask: 255, "others": 0}),
                     v2.ColorJitter(brightness=(1 / 1.5, 1.5), saturation=(1 / 1.5, 1.5)),
                     v2.RandomHorizontalFlip(), v2.Resize((s, s), antialias=True),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    class SceneMasks(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = Image.open(images[i]).convert("RGB")
            mask = np.array(Image.open(root / "masks" / "train" / (images[i].stem + ".png")))
            return tf(img, tv_tensors.Mask(torch.from_numpy(mask).long()))

    def collate(batch):
        return torch.stack([im for im, _ in batch]), torch.stack([m for _, m in batch]).long()

    meta = {"img_size": s, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
    return SceneMasks(), segmentation_names(root), meta, collate


def worker_plain(case: Case, spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cnnkit.taskapi import TaskData, get_task

    device, steps, warmup = spec["device"], spec["steps"], spec["warmup"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = _config(case, device, warmup + steps, tmp)
    task = get_task(cfg.task)
    dataset, names, meta, collate = {"classify": _plain_classify, "detect": _plain_detect,
                                     "segment": _plain_segment}[cfg.task](cfg)
    with contextlib.redirect_stdout(sys.stderr):
        model = task.build_model(cfg, TaskData(None, None, names, meta=meta)).to(device)
    if cfg.task != "classify":
        task.configure(meta)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    model.train()
    stamps: list[tuple[float, int]] = []
    epoch = 0
    while len(stamps) < warmup + steps:
        for x, y in loader:
            x = x.to(device)
            y = task.move_targets(y, device)
            loss, _parts = task.loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            loss.item()
            _sync(device)
            stamps.append((time.perf_counter(), epoch))
            if len(stamps) >= warmup + steps:
                break
        epoch += 1
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    ips, timed = _rate(stamps, warmup, cfg.batch_size)
    shape = _input_shape(spec["case"], cfg)
    flops = training_flops(model, shape, torch.device(device))
    return {"train_ips": ips, "timed_steps": timed, "batch": cfg.batch_size, "peak_mib": peak, **flops}


def run_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    case = CASES[spec["case"]]
    fn = worker_plain if spec["variant"] == "plain" else worker_cnnkit
    out = fn(case, spec)
    print(RESULT_TAG + json.dumps(out), flush=True)


def spawn(spec: dict, timeout: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            return res
    sys.stderr.write(p.stderr[-4000:])
    raise RuntimeError(f"worker {spec['case']}/{spec['variant']} failed (exit {p.returncode})")


# ---------------------------------------------------------------------------------------------- profile

GROUPS = ("convolution forward", "convolution backward", "batch norm", "elementwise / activation",
          "copies, dtype casts, fills, allocation", "matmul (linear layers)", "pooling / resampling",
          "optimizer, EMA, grad clipping", "data (loader, augmentation)", "loss and other")


def _group(evt) -> str:
    a, backward_fn = evt, None
    while a is not None:
        n = a.name
        if n.startswith("enumerate(DataLoader)") or "DataLoader" in n:
            return "data (loader, augmentation)"
        if n.startswith("Optimizer.") or "clip_grad" in n:
            return "optimizer, EMA, grad clipping"
        if n.startswith("autograd::engine::evaluate_function:"):
            backward_fn = n.split(":")[-1].strip()
        a = a.cpu_parent
    n = evt.name.lower()
    kind = (backward_fn or "").lower()
    if "convolution" in kind or ("conv" in n and "backward" in n):
        return "convolution backward"
    if "batchnorm" in kind or "batch_norm" in n:
        return "batch norm"
    if "_foreach" in n:
        return "optimizer, EMA, grad clipping"
    if "conv" in n:
        return "convolution forward"
    if any(k in n for k in ("copy_", "_to_copy", "aten::to", "contiguous", "clone", "empty", "zeros", "fill_",
                            "zero_", "memory_format", "cat", "stack")) or "tocopy" in kind:
        return "copies, dtype casts, fills, allocation"
    if any(k in n for k in ("pool", "upsample", "interpolate", "grid_sampler", "unpool")):
        return "pooling / resampling"
    if any(k in n for k in ("addmm", "aten::mm", "matmul", "aten::linear", "bmm")):
        return "matmul (linear layers)"
    if any(k in n for k in ("relu", "silu", "hardswish", "sigmoid", "gelu", "threshold", "add", "mul", "div",
                            "sub", "clamp", "hardtanh", "dropout", "bernoulli", "where", "fill_", "neg",
                            "exp", "sqrt", "pow", "masked")) or backward_fn:
        return "elementwise / activation"
    return "loss and other"


def profile_task(name: str, device: str, steps: int, warmup: int, top: int = 15) -> str:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import cnnkit.engine.trainer as trainer

    case = CASES[name]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=acts)
    stamps: list[float] = []

    def on_step(epoch, step, loss):
        _sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) == warmup:
            prof.start()
        elif len(stamps) == warmup + steps:
            prof.stop()

    trainer.evaluate = lambda *a, **k: collections.defaultdict(float)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg, explicit = _config(case, device, warmup + steps, tmp)
        trainer.fit(cfg, explicit_model=explicit, log=lambda *_: None, on_step=on_step)
    wall = stamps[-1] - stamps[warmup - 1]
    events = prof.events()
    dev_attr = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") \
        else "self_cuda_time_total"
    groups: dict[str, float] = collections.defaultdict(float)
    dgroups: dict[str, float] = collections.defaultdict(float)
    ops: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for e in events:
        if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue  # a GPU kernel: its time is counted on the op that launched it
        g = _group(e)
        groups[g] += e.self_cpu_time_total
        d = getattr(e, dev_attr, 0.0) if device == "cuda" else 0.0
        dgroups[g] += d
        o = ops[(e.name, g)]
        o[0] += e.self_cpu_time_total
        o[1] += d
        o[2] += 1
    total = sum(groups.values()) or 1.0
    dtotal = sum(dgroups.values()) or 1.0
    per = f"{steps} steps" if steps != 1 else "1 step"
    lines = [f"### Profile: cnnkit training, {case.label} ({cfg.model}, batch {cfg.batch_size}, "
             f"{cfg.img_size} px, {device})", "",
             f"torch.profiler over {per} after {warmup} warm-up steps: wall {wall / steps * 1e3:.0f} ms a step; "
             f"ops' self CPU time {total / 1e3 / steps:.0f} ms a step (the rest: Python between ops).", ""]
    head = "| group | self CPU ms / step | share |" + (" self GPU ms / step | share |" if device == "cuda" else "")
    lines += [head, "|---|---|---|" + ("---|---|" if device == "cuda" else "")]
    for g in sorted(set(GROUPS) | set(groups), key=lambda k: groups.get(k, 0.0), reverse=True):
        row = f"| {g} | {groups[g] / 1e3 / steps:.1f} | {groups[g] / total:.0%} |"
        if device == "cuda":
            row += f" {dgroups[g] / 1e3 / steps:.1f} | {dgroups[g] / dtotal:.0%} |"
        lines.append(row)
    lines += ["", f"Top {top} ops by self CPU time:", "",
              "| op | group | calls / step | self CPU ms / step | share |", "|---|---|---|---|---|"]
    for (op, g), (t, _d, n) in sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]:
        lines.append(f"| `{op}` | {g} | {n / steps:.0f} | {t / 1e3 / steps:.1f} | {t / total:.1%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- table

def _med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and r[key] == r[key]]
    return statistics.median(vals) if vals else float("nan")


def _spread(rows: list[dict], key: str, fmt: str = "{:.0f}") -> str:
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "-"
    med = fmt.format(statistics.median(vals))
    if len(vals) < 2:
        return med
    return f"{med} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


def _pct(v: float) -> str:
    """A share of a peak: whole percent, or two significant digits below 1% (small models on a GPU)."""
    return f"{v:.0%}" if v >= 0.01 else f"{100 * v:.2g}%"


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


def _model_cell(name: str, kw: dict) -> str:
    """`name` and the keyword arguments that tell the default models apart."""
    shown = [f"on {kw['backbone']}" if "backbone" in kw else "", f"width {kw['width']}" if "width" in kw else "",
             f"output stride {kw['output_stride']}" if "output_stride" in kw else "",
             f"pool {kw['pool_size']}" if "pool_size" in kw else ""]
    return f"`{name}` " + ", ".join(s for s in shown if s)


def build_table(results: dict, peaks: dict, device: str) -> tuple[str, dict]:
    """One markdown table: rows = measurements, columns = cases. Each cell: median over repeats."""
    names = [n for n in results]
    bf16 = max(peaks["bf16_3x3"], peaks["bf16_1x1"]) if peaks["bf16_3x3"] is not None else None
    fp32 = max(peaks["fp32_3x3"], peaks["fp32_1x1"])
    rows: list[tuple[str, list[str]]] = []
    summary = {}
    col = {}
    for n in names:
        p, c = results[n]["plain"], results[n]["cnnkit"]
        c0 = c[0]
        plain_ips, ck_ips = _med(p, "train_ips"), _med(c, "train_ips")
        ratio = statistics.median([a["train_ips"] and b["train_ips"] / a["train_ips"] for a, b in zip(p, c)])
        gf_c = ck_ips * c0["train_flops"] / 1e9
        gf_p = plain_ips * p[0]["train_flops"] / 1e9
        col[n] = {
            "model": _model_cell(c0["model_name"], c0["model_kwargs"]),
            "batch": f"{c0['batch']} x {c0['img_size']} px",
            "cnnkit settings": f"{c0['precision']}, {'channels_last' if c0['channels_last'] else 'NCHW'}"
                               + (f", freeze_early {c0['freeze_early']}" if c0["freeze_early"] else "")
                               + (", EMA" if c0["ema"] else ""),
            "train img/s, plain": _spread(p, "train_ips"),
            "train img/s, cnnkit": _spread(c, "train_ips"),
            "**train speed-up**": f"**{_x(ratio)}**",
            "data pipeline img/s (engine loader, no model)": _spread(c, "data_ips"),
            "**data / training consumption**": f"**{_x(_med(c, 'data_ips') / ck_ips)}**",
            "batch-1 latency ms, plain": _spread(c, "plain_latency_ms", "{:.1f}"),
            "batch-1 latency ms, cnnkit": _spread(c, "latency_ms", "{:.1f}"),
            "**batch-1 speed-up**": f"**{_x(_med(c, 'latency_ratio'))}**",
            "batched img/s, plain": f"{_spread(c, 'plain_batched_ips')}, batch {CASES[n].infer_batch}",
            "batched img/s, cnnkit": _spread(c, "batched_ips"),
            "**batched speed-up**": f"**{_x(_med(c, 'batched_ratio'))}**",
            "forward GFLOP / image (2 x MACs)": f"{2 * c0['fwd_macs'] / 1e9:.3g}",
            "training GFLOP / image, plain / cnnkit": f"{p[0]['train_flops'] / 1e9:.3g} / {c0['train_flops'] / 1e9:.3g}"
                                                      + (f" ({c0['frozen_macs_share']:.0%} of MACs frozen)"
                                                         if c0["frozen_macs_share"] > 0 else ""),
            "achieved GFLOP/s, plain / cnnkit": f"{gf_p:.0f} / {gf_c:.0f}",
            "cnnkit of bf16 conv peak": "n/a (no bf16 kernels)" if bf16 is None else
                                        _pct(gf_c / bf16) if n != "vgg" else f"**{_pct(gf_c / bf16)}**",
            "cnnkit / plain of fp32 conv peak": f"{_pct(gf_c / fp32)} / {_pct(gf_p / fp32)}",
            "peak memory MiB, plain / cnnkit": f"{_med(p, 'peak_mib'):.0f} / {_med(c, 'peak_mib'):.0f}",
        }
        summary[n] = {"train_ratio": ratio, "batched_ratio": _med(c, "batched_ratio"), "plain_ips": plain_ips,
                      "cnnkit_ips": ck_ips, "gflops": gf_c,
                      "of_bf16_peak": gf_c / bf16 if bf16 else None, "data_ratio": _med(c, "data_ips") / ck_ips}
    keys = list(next(iter(col.values())).keys())
    mem = "peak RSS of the variant's process" if device == "cpu" else "torch.cuda.max_memory_allocated"
    head = "| | " + " | ".join(CASES[n].label for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for k in keys:
        label = k.replace("peak memory MiB", f"peak memory MiB ({mem})")
        lines.append(f"| {label} | " + " | ".join(col[n][k] for n in names) + " |")
    return "\n".join(lines), summary


def section_text(table: str, peaks: dict, device: str, args, results: dict, elapsed: float) -> str:
    c = next(iter(results.values()))["cnnkit"][0]
    steps = ", ".join(f"{n} {results[n]['plain'][0]['timed_steps']}" for n in results)
    bench = "cudnn.benchmark as the engine leaves it: " + ("on" if c.get("cudnn_benchmark") else "off") \
        if device == "cuda" else ""
    lines = [
        f"### `benchmarks/speed.py --device {device}` ({datetime.date.today().isoformat()})", "",
        f"Machine: {machine_line(device)}.", "",
        f"Command: `{' '.join(['python', 'benchmarks/speed.py'] + sys.argv[1:])}`; {args.repeats} repeat(s), "
        f"plain and cnnkit alternating, each variant in a fresh process; timed training steps per repeat: "
        f"{steps}; whole run {elapsed / 60:.1f} min. Cells: median (min-max over the repeats).", "",
        table, "",
        f"Convolution peaks measured in this run (forward, channels_last): fp32 {peaks['fp32_3x3']:,.0f} GFLOP/s "
        f"(3x3 256->256) / {peaks['fp32_1x1']:,.0f} (1x1 1024->1024); "
        + (f"bf16 {peaks['bf16_3x3']:,.0f} / {peaks['bf16_1x1']:,.0f}" if peaks["bf16_3x3"] is not None
           else "bf16 n/a (no bf16 kernels on this CPU)") + "; the larger of each pair is the peak."
        + (" On CUDA \"fp32\" convolutions use TF32 (torch's default for cuDNN)." if device == "cuda" else ""), "",
        "plain: fp32, NCHW, eager, default DataLoader (0 workers), per-sample torchvision transforms on PIL "
        "images, the same model, loss, optimizer (torch's default implementation) and clipping, all layers "
        "trained, no EMA. cnnkit: `fit` with the config `cnnkit train <task>` builds. Training FLOPs count "
        "per layer what runs: forward 2 MACs + input gradient 2 MACs (when the layer's input needs one) + "
        "weight gradient 2 MACs (when its weight trains), so layers kept frozen by freeze_early cost only "
        "their forward. Inference: the model's forward on synthetic input (no decoding, no post-processing), "
        "timed in one process, plain (fp32, NCHW, BatchNorm as trained) and cnnkit "
        "(`cnnkit.engine.inference._place`: the measured precision and layout, its autocast, and in fp32 "
        "BatchNorm folded into the convolutions) in turns; the speed-ups are medians of the ratios within "
        "each process. " + bench,
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the text between <!-- bench:begin KEY --> and <!-- bench:end KEY --> (appended when absent)."""
    begin, end = f"<!-- bench:begin {key} -->", f"<!-- bench:end {key} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + block.rstrip("\n") + tail
    else:
        heading = "" if "## Speed of every task" in old else "## Speed of every task (`make bench`)\n\n"
        new = old.rstrip("\n") + "\n\n" + heading + block
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- main

def _scaled(case: Case, args) -> dict:
    steps = args.steps or case.steps
    f = min(1.0, steps / case.steps)
    warmup = args.warmup if args.warmup is not None else (case.warmup if not args.steps else min(case.warmup, 2))
    return {"steps": steps, "warmup": max(1, warmup),
            "latency_reps": max(3, round(case.latency_reps * f)), "batched_reps": max(2, round(case.batched_reps * f)),
            "data_batches": max(3, round(case.data_batches * f)), "infer_batch": case.infer_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--task", choices=(*ALL, "all"), default="all",
                    help="which case (vgg = full-width vgg11_bn at 64 px, the FLOP-rate row); all = every one")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed training steps per variant (0 = each case's own: " +
                         ", ".join(f"{n} {c.steps}" for n, c in CASES.items()) + ")")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: each case's own)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating plain/cnnkit")
    ap.add_argument("--write", action="store_true",
                    help="write the table into BENCHMARKS.md between <!-- bench:begin DEVICE --> and "
                         "<!-- bench:end DEVICE -->")
    ap.add_argument("--profile", action="store_true",
                    help="instead: torch.profiler over a few cnnkit training steps of --task, time by op group")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    names = list(ALL) if args.task == "all" else [args.task]
    if args.profile:
        texts = []
        for n in names:
            texts.append(profile_task(n, args.device, steps=args.steps or 5, warmup=args.warmup or 3))
            print(texts[-1] + "\n", flush=True)
        if args.write:
            write_section(ROOT / "BENCHMARKS.md", f"{machine_key(args.device)} profile", "\n\n".join(texts) + "\n")
            print(f"written to {ROOT / 'BENCHMARKS.md'} (section bench:{args.device} profile)")
        return

    t_start = time.perf_counter()
    print(f"machine: {machine_line(args.device)}", flush=True)
    peaks = measure_peaks(args.device)
    print("conv peaks GFLOP/s: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:,.0f}'}" for k, v in peaks.items()),
          flush=True)
    results: dict[str, dict[str, list]] = {}
    for n in names:
        spec = {"case": n, "device": args.device, "threads": args.threads, **_scaled(CASES[n], args)}
        results[n] = {"plain": [], "cnnkit": []}
        for r in range(args.repeats):
            order = ("plain", "cnnkit") if r % 2 == 0 else ("cnnkit", "plain")
            for variant in order:
                res = spawn({**spec, "variant": variant})
                results[n][variant].append(res)
                infer = (f"inference against plain: batch-1 {res['latency_ratio']:.2f}x, "
                         f"batched {res['batched_ratio']:.2f}x ({res['batched_ips']:.1f} img/s), ") \
                    if "batched_ratio" in res else ""
                print(f"  {n:<8s} repeat {r + 1}/{args.repeats} {variant:<6s}: train {res['train_ips']:7.1f} img/s, "
                      f"{infer}peak {res['peak_mib']:.0f} MiB"
                      + (f", data {res['data_ips']:.0f} img/s" if "data_ips" in res else "")
                      + f"  ({res['wall_s']:.0f} s)", flush=True)
    again = measure_peaks(args.device)  # the peak is a property of the machine: keep the better of two
    peaks = {k: None if v is None else max(v, again[k]) for k, v in peaks.items()}
    table, _summary = build_table(results, peaks, args.device)
    elapsed = time.perf_counter() - t_start
    text = section_text(table, peaks, args.device, args, results, elapsed)
    print()
    print(text)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", machine_key(args.device), text)
        print(f"written to {ROOT / 'BENCHMARKS.md'} (section bench:{args.device})")


if __name__ == "__main__":
    main()
