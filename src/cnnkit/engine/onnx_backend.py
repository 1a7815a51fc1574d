"""Predict with an exported .onnx file through onnxruntime, reusing the tasks' own predict code.

`load_onnx` returns the same `Trained` object `load_trained` returns for a .pt checkpoint; its `model`
is an `OnnxModel`, which the tasks call like the PyTorch model (a float tensor in, tensors out) and
which carries the attributes the detection code reads (S, B, num_classes, img_size). Preprocessing,
post-processing, drawing and result files are therefore exactly the .pt path's. A detection graph
exported with NMS inside is read by `InGraphNMSDetect`, whose `detect` unpads the graph's fixed-size
output instead of running `postprocess`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import UsageError, WeightsError


class OnnxModel:
    """An onnxruntime session that behaves like the exported module: `model(x)` -> tensor (or a tuple
    of tensors for a graph with several outputs)."""

    def __init__(self, path: str | Path, *, device: str = "auto"):
        from cnnkit.engine.export import load_session

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
        self.S, self.B = geometry.get("S"), geometry.get("B")
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


def in_graph_nms_task():
    """A DetectTask whose `detect` reads a graph exported with --with-nms (cnnkit.engine.export)."""
    from cnnkit.engine.export import unpad_detections
    from cnnkit.tasks.detect import DetectTask

    class InGraphNMSDetect(DetectTask):
        def detect(self, model, images, *, conf_threshold=None):
            baked = float(model.metadata["nms"]["conf_threshold"])
            conf = self.conf_threshold if conf_threshold is None else float(conf_threshold)
            if conf < baked:
                raise UsageError(f"{model.path} was exported with NMS at --conf-threshold {baked:g}; it cannot "
                                 f"return the boxes between {conf:g} and {baked:g}",
                                 fix=f"use --conf-threshold {baked:g} or more, or export again without --with-nms")
            det, count = model(images)
            # NMS then a higher threshold keeps the same boxes as that threshold then NMS: a box below it
            # never suppresses one above it.
            return [{k: v[d["scores"] > conf] for k, v in d.items()} for d in unpad_detections(det, count)]

    return InGraphNMSDetect()


def load_onnx(path: str | Path, *, device: str = "auto"):
    """A `Trained` for an exported .onnx file (metadata from the file; fp32 on the CPU, or CUDA)."""
    from cnnkit.engine.device import resolve_precision
    from cnnkit.engine.inference import Trained
    from cnnkit.tasks import get_task

    if not Path(path).is_file():
        raise WeightsError("ONNX file not found", path=str(path),
                           fix="give the path `cnnkit export --weights best.pt` wrote (best.onnx beside it)")
    model = OnnxModel(path, device=device)
    meta = model.metadata
    task = in_graph_nms_task() if meta.get("with_nms") else get_task(meta["task"])
    task.configure(meta["preprocess"])
    ckpt = {"task": meta["task"], "model": meta["model"], "names": list(meta["names"]),
            "preprocess": dict(meta["preprocess"]), "onnx": meta}
    # Tensors go in and come out on the CPU (onnxruntime copies to its device itself); fp32 throughout.
    cpu = torch.device("cpu")
    return Trained(task, model, ckpt, list(meta["names"]), cpu, resolve_precision("fp32", cpu), False)
