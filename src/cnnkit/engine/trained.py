"""A model ready to use: what `load_trained` (a checkpoint or an exported file) and `load_pretrained` return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cnnkit.engine.device import Precision, RunSettings


@dataclass
class Trained:
    """The task, the model in eval mode, its checkpoint (or exported file's metadata), class names, and the
    run settings it was placed with (device, precision, layout: one `RunSettings`)."""

    task: Any
    model: torch.nn.Module
    ckpt: dict[str, Any]
    names: list[str]
    run: RunSettings

    @property
    def img_size(self) -> int:
        return int(self.ckpt.get("preprocess", {}).get("img_size", 224))

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def precision(self) -> Precision:
        return self.run.precision

    @property
    def channels_last(self) -> bool:
        return self.run.channels_last
