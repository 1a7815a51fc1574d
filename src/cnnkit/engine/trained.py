"""A model ready to use: what `load_trained` (a checkpoint or an exported file) and `load_pretrained` return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cnnkit.engine.device import Precision, RunSettings


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

    @property
    def run(self) -> RunSettings:
        return RunSettings(self.device, self.precision, self.channels_last)
