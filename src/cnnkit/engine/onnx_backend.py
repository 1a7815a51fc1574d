"""Predict with an exported .onnx file through onnxruntime, reusing the tasks' own predict code.

`load_onnx` returns the same `Trained` object `load_trained` returns for a .pt checkpoint; its `model`
is an `OnnxModel`, which the tasks call like the PyTorch model (a float tensor in, tensors out) and
which carries the attributes the task's code reads (the metadata's `geometry` entries, num_classes,
img_size). Preprocessing, post-processing, drawing and result files are therefore exactly the .pt
path's. A graph exported with its post-processing inside is read by the task `Task.for_exported`
returns for the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import CnnkitError, UsageError, WeightsError
from cnnkit.taskapi import get_task


INSTALL_FIX = "pip install 'cnnkit[export]'"


class ExportError(CnnkitError):
    """An export that cannot be done or whose file does not reproduce PyTorch's outputs."""


def require_onnx(what: str = "ONNX export"):
    """(onnx, onnxruntime), or an error saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"{what} needs the onnx and onnxruntime packages ({exc.name} is missing)",
                          fix=INSTALL_FIX) from None
    return onnx, onnxruntime


def load_session(path: str | Path, device: str = "cpu"):
    """An onnxruntime InferenceSession on the CPU, or CUDA when asked for (and auto, when available)."""
    _, ort = require_onnx("running an .onnx model")
    available = ort.get_available_providers()
    dev = (device or "auto").lower()
    if dev.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider ({', '.join(available)})",
                         fix="pip install onnxruntime-gpu, or use --device cpu")
    want = ["CUDAExecutionProvider"] if dev.startswith("cuda") or (dev == "auto" and "CUDAExecutionProvider" in available) else []
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch is allowed
    try:
        return ort.InferenceSession(str(path), options, providers=want + ["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"onnxruntime cannot load this file ({first[:200]})", path=str(path),
                          fix="export it again with `cnnkit export --weights best.pt`") from None


class OnnxModel:
    """An onnxruntime session that behaves like the exported module: `model(x)` -> tensor (or a tuple
    of tensors for a graph with several outputs)."""

    def __init__(self, path: str | Path, *, device: str = "auto"):
        self.path = Path(path)
        self.session = load_session(self.path, device)
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata: dict[str, Any] = {k: json.loads(v) for k, v in props.items()}
        except ValueError:
            self.metadata = {}
        for key in ("task", "names", "preprocess", "model"):
            if key not in self.metadata:
                raise WeightsError(f"this ONNX file has no cnnkit metadata ({key!r} is missing)", path=str(path),
                                   fix="export the checkpoint with `cnnkit export --weights best.pt`")
        self.input_name = self.session.get_inputs()[0].name
        self.num_outputs = len(self.session.get_outputs())
        geometry = self.metadata.get("geometry", {})
        for key, value in geometry.items():  # what the task recorded of the model's shape (e.g. a grid size)
            setattr(self, key, value)
        self.num_classes = geometry.get("C", len(self.metadata["names"]))
        self.img_size = int(self.metadata["preprocess"].get("img_size", 0))
        self.in_channels = int(self.metadata["preprocess"].get("channels", 3))

    def __call__(self, x: torch.Tensor):
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def eval(self):
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, providers={self.session.get_providers()})"


def load_onnx(path: str | Path, *, device: str = "auto"):
    """A `Trained` for an exported .onnx file (metadata from the file; fp32 on the CPU, or CUDA)."""
    from cnnkit.engine.device import RunSettings, resolve_precision
    from cnnkit.engine.trained import Trained

    if not Path(path).is_file():
        raise WeightsError("ONNX file not found", path=str(path),
                           fix="give the path `cnnkit export --weights best.pt` wrote (best.onnx beside it)")
    model = OnnxModel(path, device=device)
    meta = model.metadata
    task = get_task(meta["task"]).for_exported(meta)
    task.configure(meta["preprocess"])
    ckpt = {"task": meta["task"], "model": meta["model"], "names": list(meta["names"]),
            "preprocess": dict(meta["preprocess"]), "onnx": meta}
    # Tensors go in and come out on the CPU (onnxruntime copies to its device itself); fp32 throughout.
    cpu = torch.device("cpu")
    return Trained(task, model, ckpt, list(meta["names"]), RunSettings(cpu, resolve_precision("fp32", cpu)))
