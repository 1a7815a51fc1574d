"""Using a trained checkpoint: rebuild its model with no other flag, validate it, predict with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.device import Precision, fp32_depthwise, resolve_device
from cnnkit.errors import DataError, UsageError, WeightsError


@dataclass
class Trained:
    task: Any
    model: torch.nn.Module
    ckpt: dict[str, Any]
    names: list[str]
    device: torch.device
    precision: Precision
    channels_last: bool

    @property
    def img_size(self) -> int:
        return int(self.ckpt.get("preprocess", {}).get("img_size", 224))


def load_trained(weights: str | Path, *, device: str = "auto", precision: str = "auto",
                 channels_last: str = "auto", batch_size: int = 32, log=None) -> Trained:
    """Rebuild the model a cnnkit checkpoint describes and load its (EMA, if any) weights.
    An .onnx file written by `cnnkit export` runs through onnxruntime (fp32; `precision` unused).
    `precision` / `channels_last` "auto" are measured on this CPU for batches of `batch_size`
    (`cnnkit.engine.probe`); `log` gets one line saying what was chosen."""
    from cnnkit.models import build_model
    from cnnkit.tasks import get_task

    if Path(weights).suffix.lower() == ".onnx":
        from cnnkit.engine.onnx_backend import load_onnx

        return load_onnx(weights, device=device)
    ckpt = ck.load_checkpoint(weights)
    for key in ("task", "model", "state_dict", "names"):
        if key not in ckpt:
            raise WeightsError(f"not a cnnkit checkpoint (no {key!r} entry)", path=str(weights),
                               fix="use weights/best.pt or weights/last.pt of a `cnnkit train` run")
    task = get_task(ckpt["task"])
    task.configure(ckpt.get("preprocess", {}))
    model = build_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit {ckpt['model']['name']}: {str(exc).splitlines()[0]}",
                           path=str(weights)) from None
    pre = ckpt.get("preprocess", {})
    size = int(pre.get("img_size", 224))
    shape = (min(batch_size, 32), int(pre.get("channels", 3)), size, size)  # batch 32 at most: a short probe
    model, dev, prec, cl = _place(model, task, device, precision, channels_last, shape, log)
    return Trained(task, model, ckpt, list(ckpt["names"]), dev, prec, cl)


def _place(model: torch.nn.Module, task, device: str, precision: str, channels_last: str, shape: tuple, log):
    """Move a model for inference: device, then precision and memory format forced or measured on
    forward passes of `shape` (batch, channels, height, width) as `cnnkit.engine.probe` does."""
    from cnnkit.engine.loop import to_device
    from cnnkit.engine.probe import choose, model_id

    dev = resolve_device(device)
    model = model.to(dev).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    def step(m, prec, cl):
        with torch.inference_mode(), prec.autocast():
            m(to_device(images, task, dev, cl))

    choice = choose(model, device=dev, precision=precision, channels_last=channels_last,
                    model_id=model_id(model, "inference"), shape=shape, step=step, kind="infer", log=log or _quiet)
    if log is not None:
        log(f"inference on {dev}: {choice.describe()}")
    if choice.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fp32_depthwise(model, dev, choice.precision)
    return model, dev, choice.precision, choice.channels_last


def _quiet(*args, **kwargs) -> None:
    """No log."""


def load_pretrained(model: str, weights: str, *, download: bool = False, device: str = "auto",
                    precision: str = "auto", log=print) -> Trained:
    """A registry model with pretrained weights (e.g. efficientnet_lite0 + "imagenet"), ready to predict:
    class names from the weights' metadata, preprocessing from the weights."""
    from cnnkit.models import build_model
    from cnnkit.tasks import get_task

    net = build_model(model, weights=weights, download=download)
    pre = dict(getattr(net, "cnnkit_preprocess", None) or {})
    names = list(getattr(net, "cnnkit_categories", None) or [])
    n_out = getattr(net, "num_classes", None) or len(names)
    if not names:
        names = [f"class_{i}" for i in range(n_out)]
    pre.setdefault("img_size", 224)
    pre.setdefault("mean", [0.485, 0.456, 0.406])
    pre.setdefault("std", [0.229, 0.224, 0.225])
    pre.setdefault("crop_pct", 0.875)
    pre.setdefault("channels", getattr(net, "in_channels", 3))
    task = get_task("classify")
    task.configure(pre)
    shape = (32, int(pre["channels"]), int(pre["img_size"]), int(pre["img_size"]))
    net, dev, prec, cl = _place(net, task, device, precision, "auto", shape, log)
    ckpt = {"task": "classify", "model": {"name": net.cnnkit_name, "kwargs": dict(net.cnnkit_kwargs)},
            "names": names, "preprocess": pre}
    return Trained(task, net, ckpt, names, dev, prec, cl)


def validate(weights: str | Path, *, data: str | None = None, batch_size: int = 128, device: str = "auto",
             precision: str = "auto", channels_last: str = "auto", workers: int = -1,
             out_dir: str | Path | None = None, save: tuple[str, ...] = (), log=print) -> dict[str, Any]:
    """Evaluate a checkpoint on its own validation split or on `data`; draws into out_dir.

    `save`: the predictions the evaluation scored, as files into out_dir (default: <run>/val), one
    kind per entry of the task's `saves` (detect: "json", segment: "masks"); `log` gets a line for each."""
    from cnnkit.engine.loop import evaluate
    from cnnkit.engine.trainer import make_loader

    t = load_trained(weights, device=device, precision=precision, channels_last=channels_last,
                     batch_size=batch_size, log=log)
    saved = dict(t.ckpt.get("config", {}))
    cfg = TrainConfig.from_dict({**saved, "data": data or saved.get("data"), "augment": False,
                                 "batch_size": batch_size, "workers": workers})
    cfg.img_size = t.img_size
    td = t.task.build_data(cfg)
    t.task.configure(t.ckpt.get("preprocess", {}))
    if list(td.names) != t.names:
        raise DataError(f"the data's classes {td.names} differ from the checkpoint's {t.names}",
                        path=str(data), fix="validate on data with the same class list")
    loader = make_loader(td.val, cfg, shuffle=False, collate_fn=td.collate_fn, in_memory=td.in_memory,
                         device=t.device)
    writer = None
    if save:
        kinds = tuple(dict.fromkeys(save))
        unknown = [k for k in kinds if k not in t.task.saves]
        if unknown:
            offered = ", ".join(f"--save-{k}" for k in t.task.saves) or "none"
            raise UsageError(f"--save-{unknown[0]} does not apply to a {t.task.name} checkpoint",
                             fix=f"{t.task.name} offers: {offered}")
        target = Path(out_dir) if out_dir is not None else Path(weights).resolve().parent.parent / "val"
        writer = t.task.result_writer(kinds, td, target)
        t.task.on_prediction = writer.add
    try:
        metrics = evaluate(t.model, t.task, loader, t.precision, device=t.device, channels_last=t.channels_last,
                           names=t.names)
    finally:
        t.task.on_prediction = None
    if writer is not None:
        for line in writer.close():
            log(line)
    if out_dir is not None:
        t.task.draw(metrics, Path(out_dir), names=t.names)
    return metrics
