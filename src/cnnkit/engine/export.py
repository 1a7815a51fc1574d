"""Export a cnnkit checkpoint to ONNX or TorchScript, then check the file against PyTorch.

What is exported is the model of the checkpoint in eval mode and fp32, taking the tensor the task's
`prepare` makes (float [N, C, H, W], normalised as the checkpoint's `preprocess` says) and returning
its raw output: classification logits [N, classes], YOLO predictions [N, S, S, 5B + C], segmentation
logits [N, classes, H, W]. The batch dimension of an ONNX file is dynamic; H and W are fixed at
`img_size`.

The task makes the module that is exported (`Task.export_module`): with `with_nms=True` a task that
offers it puts its post-processing inside the graph (the detector's: YOLO with NMS, `tasks/yolo_export.py`), whose
outputs are `detections [N, max_det, 6]` and `count [N]`.

ONNX metadata (`metadata_props`, JSON values) holds what `cnnkit predict` needs to use the file with no
other flag: task, names, preprocess, model (name and kwargs), geometry (YOLO's S, B, C, img_size),
with_nms and nms (thresholds baked into the graph). A TorchScript file carries the same dict as the
extra file `cnnkit.json`; one with NMS inside calls torchvision's `nms` operator, so load it after
`import torchvision`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import cnnkit
from cnnkit.engine.onnx_backend import ExportError, load_session, require_onnx  # noqa: F401  (re-exported)
from cnnkit.errors import UsageError

FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}
DEFAULT_OPSET = 17
TOLERANCE = 1e-4  # absolute and relative, fp32


# --- export -------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    path: Path
    format: str
    metadata: dict[str, Any]
    checks: list[tuple[str, float]] = field(default_factory=list)  # (what was compared, max abs difference)

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d in self.checks), default=0.0)


def default_out(weights: str | Path, fmt: str) -> Path:
    return Path(weights).with_suffix(FORMATS[fmt])


@dataclass
class ExportSettings:
    """What `cnnkit export` is asked for: format, file, input size, opset, example batch, post-processing
    in the graph (`with_nms` and its thresholds, for the tasks that offer it), and the check."""

    format: str = "onnx"
    out: str | Path | None = None
    img_size: int | None = None
    opset: int = DEFAULT_OPSET
    batch_size: int = 1
    with_nms: bool = False
    conf_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_det: int = 100
    check: bool = True

    def nms(self) -> dict[str, Any] | None:
        if not self.with_nms:
            return None
        return {"conf_threshold": self.conf_threshold, "iou_threshold": self.iou_threshold, "max_det": self.max_det}


def build_export_module(weights: str | Path, *, img_size: int | None = None, with_nms: bool = False,
                        conf_threshold: float = 0.25, iou_threshold: float = 0.5, max_det: int = 100):
    """(module in eval mode on the CPU in fp32, task, metadata dict) for a cnnkit checkpoint; the task
    makes the module (`Task.export_module`: e.g. a detector with its NMS in the graph)."""
    from cnnkit.engine.inference import load_trained

    if Path(weights).suffix.lower() == ".onnx":
        raise UsageError(f"{weights} is already an ONNX file", fix="export the .pt checkpoint it came from")
    t = load_trained(weights, device="cpu", precision="fp32", channels_last="off", fold_bn=False)  # the model as trained
    model = t.model.float().to(memory_format=torch.contiguous_format).eval()
    pre = dict(t.ckpt.get("preprocess", {}))
    size = int(img_size or t.img_size)
    if size < 1:
        raise UsageError(f"--img-size must be positive, got {size}")
    pre["img_size"] = size
    pre.setdefault("channels", int(getattr(model, "in_channels", 3)))
    meta: dict[str, Any] = {"cnnkit_version": cnnkit.__version__, "task": t.task.name, "names": list(t.names),
                            "preprocess": pre, "model": dict(t.ckpt["model"]), "with_nms": bool(with_nms)}
    nms = ExportSettings(with_nms=with_nms, conf_threshold=conf_threshold, iou_threshold=iou_threshold,
                         max_det=max_det).nms()
    module = t.task.export_module(model, meta, nms).eval()
    meta["outputs"] = t.task.export_outputs(with_nms)
    return module, t.task, meta


def example_inputs(task, meta: dict[str, Any], batch_size: int) -> list[tuple[str, torch.Tensor]]:
    """Inputs the check runs: random at `batch_size` and `batch_size + 2` (two batch sizes: the
    dynamic batch) and the package's real photos, resized and prepared as predict prepares them."""
    from torchvision.transforms import v2

    from cnnkit.data.images import decode_image, to_channels

    pre = meta["preprocess"]
    c, size = int(pre["channels"]), int(pre["img_size"])
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(pre.get("mean", [0.0] * c), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.get("std", [1.0] * c), dtype=torch.float32).view(1, -1, 1, 1)
    out = [(f"random input, batch {n}", (torch.rand(n, c, size, size, generator=g) - mean) / std)
           for n in (batch_size, batch_size + 2)]
    photos = sorted((Path(cnnkit.__file__).parent / "assets" / "photos").glob("*.jpg"))
    if photos:
        imgs = [v2.functional.resize(to_channels(decode_image(p), c), [size, size], antialias=True) for p in photos]
        out.append((f"{len(photos)} photos from cnnkit/assets/photos", task.prepare(torch.stack(imgs)).float()))
    return out


def export(weights: str | Path, settings: ExportSettings | None = None, **changes) -> ExportResult:
    """Export the checkpoint `weights` (see the module doc) as `settings` (or `ExportSettings(**changes)`)
    say; with `check`, run the file on random and real inputs at two batch sizes and raise ExportError
    unless it matches PyTorch within 1e-4 (`check_export`)."""
    s = dataclasses.replace(settings or ExportSettings(), **changes)
    format, with_nms, batch_size, opset = s.format, s.with_nms, s.batch_size, s.opset
    from cnnkit.engine.checkpoint import atomic_path, atomic_write_bytes

    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}", fix=f"choose one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if format == "onnx":
        onnx, _ = require_onnx()
    out = Path(s.out) if s.out else default_out(weights, format)
    module, task, meta = build_export_module(weights, img_size=s.img_size, with_nms=with_nms,
                                             conf_threshold=s.conf_threshold, iou_threshold=s.iou_threshold,
                                             max_det=s.max_det)
    inputs = example_inputs(task, meta, batch_size)
    example = inputs[0][1]
    if format == "onnx":
        meta["opset"] = int(opset)
        data = _export_onnx(module, example, opset=opset, with_nms=with_nms)
        proto = onnx.load_from_string(data)
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        atomic_write_bytes(out, proto.SerializeToString())
    else:
        # torch.jit.trace, not script: the models' Python (input checks, registry options) is not
        # TorchScript; the traced graph keeps the batch dynamic because nothing loops over images.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks torch.jit deprecated
            traced = torch.jit.trace(module, (example,), check_trace=False)
            with atomic_path(out) as tmp:
                torch.jit.save(traced, tmp, _extra_files={"cnnkit.json": json.dumps(meta)})
    result = ExportResult(out, format, meta)
    if s.check:
        result.checks = check_export(out, module, inputs, format=format, with_nms=with_nms)
    return result


class PoolAsMatmul(nn.Module):
    """`nn.AdaptiveAvgPool2d` at one fixed input size as two matrix products, y = P_h x P_w^T, with
    PyTorch's windows (rows floor(i * in / out) to ceil((i + 1) * in / out)). The TorchScript ONNX exporter
    takes adaptive pooling only when the output size divides an input size it can see, which rules out
    e.g. YOLO's pool to S x S behind a timm backbone and AlexNet's 6 x 6 pool at small inputs."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("ph", self._matrix(in_hw[0], out_hw[0]), persistent=False)
        self.register_buffer("pw", self._matrix(in_hw[1], out_hw[1]).t().contiguous(), persistent=False)

    @staticmethod
    def _matrix(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            m[i, start:end] = 1.0 / (end - start)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.ph, x), self.pw)


def fixed_size_pools(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `module` whose adaptive average pools are fixed for the example's H x W: the identity
    where the input already has the output size, `PoolAsMatmul` elsewhere. The original is untouched
    (the export check compares the file against it)."""
    sizes: dict[str, Any] = {}

    def hook(name):
        def record(mod, inputs, output):
            seen = (tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]))
            sizes[name] = seen if sizes.get(name, seen) == seen else None  # one call size only
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules()
               if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    if not any(sizes.values()):
        return module
    module = copy.deepcopy(module)
    for name, seen in sizes.items():
        if seen:
            parent, _, attr = name.rpartition(".")
            new = nn.Identity() if seen[0] == seen[1] else PoolAsMatmul(*seen)
            setattr(module.get_submodule(parent) if parent else module, attr, new)
    return module


def _export_onnx(module: nn.Module, example: torch.Tensor, *, opset: int, with_nms: bool) -> bytes:
    """The ONNX bytes of `module`.

    The TorchScript-based exporter (dynamo=False) is used on purpose: with torch 2.14 it exports every
    cnnkit model in 1-3 s at the opset asked for, and it takes the data-dependent detection graph
    (NonZero, NonMaxSuppression through `_OnnxNMS.symbolic`) as it is. The torch.export-based exporter
    (dynamo=True) needs onnxscript, takes 5-7 s for the same small models, only writes opset >= 18 (its
    down-conversion to 17 failed on Unsqueeze/Reduce axes), and has no translation for NMS without a
    custom onnxscript table; its outputs were equal for the plain models, so nothing is lost."""
    names = ["detections", "count"] if with_nms else ["output"]
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    module = fixed_size_pools(module, example)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=names,
                              dynamic_axes=dynamic, opset_version=int(opset), do_constant_folding=True,
                              dynamo=False)
        except Exception as exc:  # an opset without an operator the model needs, an unsupported layer
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"ONNX export failed at opset {opset}: {first[:200]}",
                              fix="try another --opset (11-20), or --format torchscript") from None
    return buf.getvalue()


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1: when an export fails, the TorchScript exporter's C++ logger prints
    the whole graph there (torch 2.14 switches it on by mistake: `setup_onnx_logging` tests the
    function `_jit_is_onnx_log_enabled`, not its result); the error keeps its first line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_export(path: Path, module: nn.Module, inputs: list[tuple[str, torch.Tensor]], *, format: str = "onnx",
                 with_nms: bool = False) -> list[tuple[str, float]]:
    """Run the exported file and the PyTorch module on each input; returns (input, max abs difference)
    and raises ExportError where an output differs by more than 1e-4 x max(1, its largest magnitude)."""
    if format == "onnx":
        session = load_session(path, "cpu")

        def run(x):
            return [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path), map_location="cpu")

        def run(x):
            with torch.no_grad():
                o = loaded(x)
            return list(o) if isinstance(o, (tuple, list)) else [o]
    checks = []
    for label, x in inputs:
        with torch.no_grad():
            ref = module(x)
        ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        got = run(x)
        if with_nms and not torch.equal(got[1].long(), ref[1].long()):
            raise ExportError(f"{label}: the exported NMS kept {got[1].tolist()} detections, PyTorch "
                              f"{ref[1].tolist()}", path=str(path), fix="report this as a bug")
        if any(g.shape != r.shape for g, r in zip(got, ref)):
            raise ExportError(f"{label}: output shapes {[tuple(g.shape) for g in got]} differ from PyTorch's "
                              f"{[tuple(r.shape) for r in ref]}", path=str(path), fix="report this as a bug")
        diff = max(float((g.double() - r.double()).abs().max()) if r.numel() else 0.0 for g, r in zip(got, ref))
        # 1e-4 absolute, relative to the output's scale: fp32 itself rounds large outputs (the logits of an
        # untrained U-Net reach 200-400) by more than 1e-4, in PyTorch as much as in onnxruntime.
        limit = max(TOLERANCE * max(1.0, float(r.abs().max()) if r.numel() else 1.0) for r in ref)
        if diff > limit:
            raise ExportError(f"{label}: outputs differ from PyTorch's by up to {diff:.3g} (tolerance {limit:.3g}"
                              f" = 1e-4 x max(1, largest output))", path=str(path),
                              fix="try another --opset, or --format torchscript")
        checks.append((label, diff))
    return checks
