"""Model registry: every architecture registers a builder under a name.

`build_model(name, **kwargs)` builds one; `list_models()` lists them. An unknown name raises a
`ModelError` that suggests the closest registered names.

The registry knows no architecture: each module registers its own builders when it is imported, and
`cnnkit/models/__init__.py` imports them all, so every built-in name is registered before any lookup
(importing `cnnkit.models.registry` runs the package's `__init__` first). Of the model modules it
imports only `inputs` and the weights loader (for `build_model(..., weights=...)`), which in turn
imports only `backbone_base`: the architectures import the registry, never the other way round.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.inputs import name_key
from cnnkit.models.weights import load_weights


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    task: str = "classify"
    description: str = ""
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str = "classify", description: str = "", **defaults):
    """Decorator: register `builder` under `name` (case-insensitive, '-' and '_' alike: `name_key`)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name_key(name)
        if key in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        doc = description or "".join((builder.__doc__ or "").strip().splitlines()[0:1])
        _REGISTRY[key] = ModelEntry(name, builder, task, doc, dict(defaults))
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    key = name_key(name)
    if key not in _REGISTRY:
        names = {e.name: e for e in _REGISTRY.values()}
        close = difflib.get_close_matches(name.strip().lower(), list(names), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `cnnkit models` to list them"
        raise ModelError(f"unknown model {name!r}", fix=hint)
    return _REGISTRY[key]


def build_model(name: str, *, weights=None, download: bool = False, log=print, **kwargs) -> nn.Module:
    """Build the registered model `name` with `kwargs` passed to its builder.

    `weights` ("imagenet", a torchvision weight name such as "VGG16_Weights.IMAGENET1K_V1", or a
    .safetensors/.pt/.pth file) are loaded after building, with timm-style head surgery; `download`
    allows fetching uncached weights and `log` receives the one-line report
    (`cnnkit.models.weights.load_weights`). `model.cnnkit_kwargs` records `kwargs` only, so a cnnkit
    checkpoint rebuilds the architecture and then loads its own state_dict.
    """
    entry = get_entry(name)
    merged = {**entry.defaults, **kwargs}
    try:
        model = entry.builder(**merged)
    except TypeError as exc:  # an option the builder does not take
        raise ModelError(f"model {entry.name!r} does not accept these options: {exc}") from None
    # What a checkpoint needs to rebuild this model with no other flag.
    model.cnnkit_name = entry.name  # type: ignore[attr-defined]
    model.cnnkit_kwargs = dict(kwargs)  # type: ignore[attr-defined]
    if weights is not None:
        load_weights(model, weights, download=download, log=log)
    return model


def list_models(task: str | None = None) -> list[str]:
    return sorted(e.name for e in _REGISTRY.values() if task is None or e.task == task)
