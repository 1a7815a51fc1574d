"""Device, precision and memory-format choices, made once per run.

On a CPU, `--precision auto` and `--channels-last auto` are decided by measurement
(`cnnkit.engine.probe`): bf16 is a candidate where oneDNN supports it (AVX512-BF16 / AMX; with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 it is not). On CUDA, auto is bf16 where supported
(fp16 with a gradient scaler otherwise) and channels_last; `resolve_precision("auto")` states that rule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cnnkit.errors import UsageError
from cnnkit.utils import usable_cpus

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", fix="use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here", fix="use --device cpu")
    return dev


@dataclass(frozen=True)
class Precision:
    """How a run computes: autocast dtype (None = fp32) and whether a gradient scaler is needed."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass(frozen=True)
class RunSettings:
    """Where and how a model runs: device, precision and memory layout, chosen once and passed as one."""

    device: torch.device
    precision: Precision
    channels_last: bool = False

    def inputs(self, images: torch.Tensor, task) -> torch.Tensor:
        """A uint8 batch -> on the device, prepared by the task (normalised), in the run's layout."""
        x = task.prepare(images.to(self.device, non_blocking=True))
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        return self.precision.autocast()


def resolve_precision(name: str, device: torch.device) -> Precision:
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}", fix=f"choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cpu":
            name = "bf16" if cpu_supports_bf16() else "fp32"
        elif device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UsageError("fp16 autocast is for CUDA", fix="use --precision bf16 or fp32 on a CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, device.type)


def auto_workers(in_memory: bool, device: torch.device | None = None) -> int:
    """DataLoader workers: cores - 1 (at most 8), except for in-memory data on the CPU, where a worker
    only steals a core from the model. On a GPU the CPU is free while the model runs, so even in-memory
    data gets workers (augmentation otherwise starves the GPU: benchmarks/speed.py --device cuda)."""
    if in_memory and (device is None or device.type == "cpu"):
        return 0
    return max(0, min(8, usable_cpus() - 1))


_FP32_CLASSES: dict[type, type] = {}


def _fp32_variant(cls: type) -> type:
    """A subclass of the convolution class `cls` whose forward runs in fp32 with autocast off while
    autograd records (training); without gradients (evaluation, prediction) it runs as autocast says."""
    if cls not in _FP32_CLASSES:
        def forward(self, x):
            if not torch.is_grad_enabled():
                return super(variant, self).forward(x)
            with torch.autocast("cpu", enabled=False):
                return super(variant, self).forward(x.float())

        variant = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                         "__doc__": f"{cls.__name__}, trained in fp32 under autocast."})
        _FP32_CLASSES[cls] = variant
    return _FP32_CLASSES[cls]


def fp32_depthwise(model: torch.nn.Module, device: torch.device, precision: Precision) -> int:
    """Run depthwise convolutions (groups == in_channels > 1) in fp32 under CPU bf16 autocast.

    oneDNN's bf16 depthwise convolution is slower than its fp32 one on the CPUs measured here (forward +
    backward 2-4x slower for EfficientNet-Lite0's depthwise layers, see BENCHMARKS.md), while bf16 pays for
    dense and pointwise convolutions; switching only the depthwise layers trains EfficientNet-based models
    1.3x faster. Each such layer's class is swapped for a subclass that turns autocast off around its own
    forward while gradients are recorded (parameters and state_dict keys are unchanged). Forward-only
    passes (evaluation, prediction, under no_grad / inference_mode) stay in bf16: oneDNN's bf16 depthwise
    forward is fast, and inference of the YOLO / U-Net defaults measured 2.2x / 1.25x faster in bf16 than
    with fp32 depthwise layers (BENCHMARKS.md). Returns the number of layers switched; does nothing on
    other devices and precisions.
    """
    if device.type != "cpu" or precision.dtype is not torch.bfloat16:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels \
                and type(m) not in _FP32_CLASSES.values():
            m.__class__ = _fp32_variant(type(m))
            n += 1
    return n
