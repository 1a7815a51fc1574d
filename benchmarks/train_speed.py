"""Training speed: a plain PyTorch loop against cnnkit's engine, same model, data and steps, one run.

(a) plain: fp32, NCHW, eager, default DataLoader, PIL transforms + ToTensor per sample (as a typical
    user writes it with torchvision);
(b) cnnkit: `cnnkit.engine.fit` with its defaults (bf16 autocast + channels_last where the CPU can,
    uint8 augmentation, in-memory data).
Prints images/s of each, their ratio, the final losses, and the achieved GFLOP/s against the fp32 and
bf16 convolution peaks of this machine measured in the same run. Usage:

    python benchmarks/train_speed.py [--steps 150] [--model vgg11_bn] [--width 0.5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from cnnkit.data import load_classification_data
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trainer import fit
from cnnkit.models import build_model
from cnnkit.models.summary import summarize


def conv_peak(dtype: torch.dtype | None, device: str, reps: int = 10) -> float:
    """GFLOP/s of a large 3x3 convolution (forward), the machine's practical convolution peak."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    x = torch.randn(32, 256, 28, 28, device=device)
    if dtype is not None:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 28 * 28 * 32
    times = []
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(reps + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            conv(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


class PilDataset(torch.utils.data.Dataset):
    """The embedded images served as PIL images through classic torchvision transforms."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from PIL import Image

        img, label = self.base[i]
        return self.transform(Image.fromarray(img.squeeze(0).numpy())), label


def plain_loop(args, model_kwargs) -> tuple[float, float]:
    torch.manual_seed(0)
    data = load_classification_data(args.data)
    # the same augmentation as cnnkit's (pad 28 -> 32, crop, flip, random erasing), written the classic way
    tf = T.Compose([T.Pad(2), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.5,), (0.25,)), T.RandomErasing(p=0.5, scale=(0.02, 0.25), value=-2.0)])
    loader = torch.utils.data.DataLoader(PilDataset(data.train, tf), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True)
    model = build_model(args.model, num_classes=10, in_channels=1, **model_kwargs).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    steps, seen, losses = 0, 0, []
    start = None
    while steps < args.steps + args.warmup:
        for x, y in loader:
            if steps == args.warmup:
                start = time.perf_counter()
                seen = 0
            x, y = x.to(args.device), y.to(args.device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
            seen += x.shape[0]
            if steps >= args.steps + args.warmup:
                break
    return seen / (time.perf_counter() - start), statistics.mean(losses[-20:])


def engine_loop(args, model_kwargs) -> tuple[float, float]:
    losses, marks = [], {}

    def on_step(epoch, step, loss):
        losses.append(loss)
        if len(losses) == args.warmup:
            marks["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(task="classify", model=args.model, model_kwargs=model_kwargs, data=args.data,
                          epochs=100, batch_size=args.batch_size, img_size=32, lr=args.lr, schedule="constant",
                          warmup_epochs=0, project=tmp, name="bench", progress=False, plots=False,
                          device=args.device, max_steps=args.steps + args.warmup, precision=args.precision)
        import cnnkit.engine.trainer as trainer

        real_eval = trainer.evaluate
        trainer.evaluate = lambda *a, **k: {"top1": 0.0}  # time training only
        try:
            fit(cfg, log=lambda *_: None, on_step=on_step)
        finally:
            trainer.evaluate = real_eval
        elapsed = time.perf_counter() - marks["t"]
    return args.steps * args.batch_size / elapsed, statistics.mean(losses[-20:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg11_bn")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model_kwargs = {"width": args.width, "pool_size": 1, "dropout": 0.2}  # the demo's model

    macs = summarize(build_model(args.model, num_classes=10, in_channels=1, **model_kwargs), (1, 32, 32)).macs
    train_flops_per_image = 6 * macs  # forward 2*MACs, backward twice the forward
    peak32, peak16 = conv_peak(None, args.device), conv_peak(torch.bfloat16, args.device)
    plain_ips, plain_loss = plain_loop(args, model_kwargs)
    eng_ips, eng_loss = engine_loop(args, model_kwargs)
    gflops = eng_ips * train_flops_per_image / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model} width {args.width} at 1x32x32: {macs / 1e6:.1f} M MACs/image, batch {args.batch_size}, {args.steps} timed steps")
    print(f"conv peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"plain loop : {plain_ips:8.0f} img/s   final loss {plain_loss:.3f}")
    print(f"cnnkit     : {eng_ips:8.0f} img/s   final loss {eng_loss:.3f}")
    print(f"ratio      : {eng_ips / plain_ips:.2f}x")
    print(f"achieved   : {gflops:.0f} GFLOP/s = {gflops / peak16:.0%} of bf16 peak, {gflops / peak32:.0%} of fp32 peak")


if __name__ == "__main__":
    main()
