"""Using a trained checkpoint: rebuild its model with no other flag, validate it, predict with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trained import Trained  # noqa: F401  (re-exported: cnnkit.engine.inference.Trained)
from cnnkit.engine.device import RunSettings, fp32_depthwise, resolve_device, resolve_precision
from cnnkit.engine.probe import ProbeRequest
from cnnkit.errors import DataError, UsageError, WeightsError
from cnnkit.taskapi import get_task


def load_trained(weights: str | Path, *, device: str = "auto", precision: str = "auto",
                 channels_last: str = "auto", batch_size: int = 32, fold_bn: str | bool = "auto",
                 log=None) -> Trained:
    """Rebuild the model a cnnkit checkpoint describes and load its (EMA, if any) weights.
    An .onnx file written by `cnnkit export` runs through onnxruntime (fp32; `precision` unused).
    `precision` / `channels_last` "auto" are measured on this CPU for batches of `batch_size`
    (`cnnkit.engine.probe`); `fold_bn` ("auto", "on", "off"): BatchNorm folded into the convolution before it
    (`cnnkit.engine.fold`: fewer passes over memory; "auto" folds in fp32 only, see `_place`); `log` gets one
    line saying what was chosen."""
    from cnnkit.models import build_model

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
    model, run = _place(model, task, ProbeRequest(resolve_device(device), precision, channels_last,
                                                  "", shape, kind="infer"), log, fold_bn=fold_bn)
    return Trained(task, model, ckpt, list(ckpt["names"]), run)


FOLD_BN = ("auto", "on", "off")


def _fold_setting(fold_bn: str | bool) -> str:
    setting = ("on" if fold_bn else "off") if isinstance(fold_bn, bool) else str(fold_bn)
    if setting not in FOLD_BN:
        raise UsageError(f"fold_bn must be one of {', '.join(FOLD_BN)}, got {fold_bn!r}", fix="--fold-bn auto")
    return setting


def _place(model: torch.nn.Module, task, request: ProbeRequest, log,
           fold_bn: str | bool = "auto") -> tuple[torch.nn.Module, RunSettings]:
    """Move a model for inference: device, then precision and memory format forced or measured on
    forward passes of `request.shape` (batch, channels, height, width) as `cnnkit.engine.probe` does,
    then BatchNorm folded into the convolution before it (`cnnkit.engine.fold`): "on", "off", or "auto" =
    folded when the run computes in fp32, where the folded model gives the same metrics; with bf16 /
    fp16 the folded weights round differently, which cost detection 0.004 AP50 on average over four
    checkpoints (BENCHMARKS.md "BatchNorm folded at inference"), so "auto" keeps BatchNorm there."""
    from cnnkit.engine.fold import fold_batchnorm
    from cnnkit.engine.probe import choose, model_id

    setting = _fold_setting(fold_bn)
    dev = request.device
    model = model.to(dev).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, request.shape, dtype=torch.uint8, generator=generator)

    def step(m, prec, cl):
        run = RunSettings(dev, prec, cl)
        with torch.inference_mode(), run.autocast():
            m(run.inputs(images, task))

    request = dataclasses.replace(request, model_id=model_id(model, "inference"))
    choice = choose(model, request, step=step, log=log or _quiet)
    said = ""
    if setting == "on" or (setting == "auto" and choice.precision.dtype is None):
        example = RunSettings(dev, resolve_precision("fp32", dev), False).inputs(images[:2], task)
        folding = fold_batchnorm(model, example)
        model, said = folding.model, folding.describe()
    elif setting == "auto" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        said = f"BatchNorm kept (with {choice.precision.name} folded weights round differently; --fold-bn on folds)"
    if log is not None:
        log(f"inference on {dev}: {choice.describe()}" + (f"; {said}" if said else ""))
    if choice.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fp32_depthwise(model, dev, choice.precision)
    return model, RunSettings(dev, choice.precision, choice.channels_last)


def _quiet(*args, **kwargs) -> None:
    """No log."""


def load_pretrained(model: str, weights: str, *, download: bool = False, device: str = "auto",
                    precision: str = "auto", fold_bn: str | bool = "auto", log=print) -> Trained:
    """A registry model with pretrained weights (e.g. efficientnet_lite0 + "imagenet"), ready to predict,
    by the task its registry entry names: class names and preprocessing from the weights
    (`Task.from_pretrained`)."""
    from cnnkit.models import build_model, get_entry

    net = build_model(model, weights=weights, download=download)
    task = get_task(get_entry(model).task)
    pre, names = task.from_pretrained(net)
    task.configure(pre)
    shape = (32, int(pre["channels"]), int(pre["img_size"]), int(pre["img_size"]))
    net, run = _place(net, task, ProbeRequest(resolve_device(device), precision, "auto", "", shape, kind="infer"), log,
                      fold_bn=fold_bn)
    ckpt = {"task": task.name, "model": {"name": net.cnnkit_name, "kwargs": dict(net.cnnkit_kwargs)},
            "names": names, "preprocess": pre}
    return Trained(task, net, ckpt, names, run)


def validate(weights: str | Path, *, data: str | None = None, out_dir: str | Path | None = None,
             save: tuple[str, ...] = (), log=print, **load) -> dict[str, Any]:
    """Evaluate a checkpoint on its own validation split or on `data`; draws into out_dir.

    `load`: batch_size (128), device, precision, channels_last ("auto" each) and workers (-1) as
    `load_trained` and the loader take them. `save`: the predictions the evaluation scored, as files into
    out_dir (default: <run>/val), one kind per entry of the task's `saves`; `log` gets a line for each."""
    from cnnkit.engine.loop import evaluate

    batch_size, workers = int(load.pop("batch_size", 128)), int(load.pop("workers", -1))
    t = load_trained(weights, batch_size=batch_size, log=log, **load)
    loader, td = validation_loader(t, data, batch_size, workers)
    writer = _result_writer(t, td, save, out_dir, weights)
    metrics = evaluate(t.model, t.task, loader, t.run, names=t.names,
                       on_prediction=writer.add if writer is not None else None)
    if writer is not None:
        for line in writer.close():
            log(line)
    if out_dir is not None:
        t.task.draw(metrics, Path(out_dir), names=t.names)
    return metrics


def validation_loader(t: Trained, data: str | None, batch_size: int, workers: int = -1):
    """(loader, TaskData) of the checkpoint's validation split, or of `data` (same classes required)."""
    from cnnkit.engine.runs import make_loader

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
    return loader, td


def _result_writer(t: Trained, td, save, out_dir, weights):
    if not save:
        return None
    kinds = tuple(dict.fromkeys(save))
    unknown = [k for k in kinds if k not in t.task.saves]
    if unknown:
        offered = ", ".join(f"--save-{k}" for k in t.task.saves) or "none"
        raise UsageError(f"--save-{unknown[0]} does not apply to a {t.task.name} checkpoint",
                         fix=f"{t.task.name} offers: {offered}")
    target = Path(out_dir) if out_dir is not None else Path(weights).resolve().parent.parent / "val"
    return t.task.result_writer(kinds, td, target)
