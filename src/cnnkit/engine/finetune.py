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
    params = backbone_parameters(model)
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


def train_mode(model: nn.Module) -> None:
    """model.train(), except the normalisation layers of a frozen backbone, which stay in eval mode."""
    model.train()
    for m in getattr(model, "cnnkit_frozen_norms", ()):
        m.eval()
