"""Fine-tuning controls: freeze the backbone (its BatchNorm kept in eval mode while frozen), unfreeze
it at a given epoch, and give it its own learning rate through parameter groups.

"Backbone" is every parameter outside the classifier / head, as `cnnkit.models.backbones`
defines it for each architecture.
"""

from __future__ import annotations

import torch.nn as nn


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    from cnnkit.models.backbones import backbone_parameters as _bp

    return list(_bp(model))


def is_frozen_at(epoch: int, freeze_backbone: bool, unfreeze_at: int) -> bool:
    """Frozen during 0-based `epoch`? `unfreeze_at` is the 1-based epoch that trains it again (0 = never)."""
    return freeze_backbone and (unfreeze_at <= 0 or epoch + 1 < unfreeze_at)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> int:
    """Switch requires_grad of the backbone's parameters; returns how many tensors changed state.

    While frozen, the backbone's normalisation layers are listed in `model.cnnkit_frozen_norms` and
    `train_mode` keeps them in eval mode, so their running statistics do not move either."""
    early = {id(p) for m in getattr(model, "cnnkit_early_frozen", ()) for p in m.parameters(recurse=False)}
    params = [p for p in backbone_parameters(model) if id(p) not in early]
    ids = {id(p) for p in params}
    changed = 0
    for p in params:
        if p.requires_grad == frozen:
            changed += 1
        p.requires_grad_(not frozen)
    norms = []
    if frozen:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and any(id(p) in ids for p in m.parameters(recurse=False)):
                norms.append(m)
    model.cnnkit_frozen_norms = norms  # type: ignore[attr-defined]
    return changed


def freeze_early(model: nn.Module, max_stride: int) -> int:
    """Keep the backbone layers that run at stride <= `max_stride` frozen for the whole run (their
    normalisation layers in eval mode), as detectron2's FREEZE_AT does: the ImageNet low-level features
    stay as they are and no gradient is computed for the high-resolution layers, the most expensive
    ones to back-propagate through. Returns the number of parameter tensors frozen (0 for max_stride 0).
    `--unfreeze-at` never trains these layers."""
    from cnnkit.models.backbones import early_layers

    if max_stride <= 0:
        return 0
    layers = early_layers(model, max_stride)
    n = 0
    for m in layers:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
            n += 1
    model.cnnkit_early_frozen = layers  # type: ignore[attr-defined]
    return n


def train_mode(model: nn.Module) -> None:
    """model.train(), except the normalisation layers of a frozen backbone and of the early layers kept
    frozen (`freeze_early`), which stay in eval mode. `model` may be wrapped (DDP, torch.compile)."""
    from cnnkit.models.backbones import _unwrap

    model.train()
    inner = _unwrap(model)
    for m in getattr(inner, "cnnkit_frozen_norms", ()):
        m.eval()
    for m in getattr(inner, "cnnkit_early_frozen", ()):
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()
