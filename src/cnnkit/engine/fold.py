"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm layer is a fixed affine map per channel: with its running mean m and variance v,
its scale g and shift b, it computes y = (x - m) * s + b with s = g / sqrt(v + eps). When x is the output
of a convolution with weight W and bias c, the map moves into the convolution: each output channel o gets
W'[o] = W[o] * s[o] and c'[o] = (c[o] - m[o]) * s[o] + b[o]. The network then computes the same function
(up to float rounding, checked below) without one pass over each activation map, which is what BatchNorm
costs at inference: a memory-bound pass that bf16 and channels_last do not speed up (BENCHMARKS.md
"BatchNorm folded at inference" measures it).

`fold_batchnorm(model, example)` finds the pairs by running `example` through the model once with hooks
(a BatchNorm whose input is exactly the output tensor of a convolution), folds each pair in a copy of the
model, and keeps the copy only if it gives the same outputs as the original on `example`; otherwise
(a convolution's output also used by something other than its BatchNorm, which hooks cannot see) it
returns the original model untouched and says why. Only for inference: the folded copy has no BatchNorm
left to train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cnnkit.models.backbone_base import _set_submodule

REL_TOLERANCE = 1e-4  # largest output change allowed, relative to the output's largest magnitude


@dataclass(frozen=True)
class FoldResult:
    """The model to run, how many BatchNorm layers it had and how many were folded, and why none were
    when the check refused the folded copy (empty otherwise)."""

    model: nn.Module
    folded: int
    batchnorms: int
    refused: str = ""

    def describe(self) -> str:
        if self.refused:
            return f"BatchNorm not folded ({self.refused})"
        if not self.batchnorms:
            return "no BatchNorm to fold"
        return f"BatchNorm folded into the convolution before it: {self.folded} of {self.batchnorms} layers"


def _replacement(bn: nn.Module) -> nn.Module | None:
    """What a folded BatchNorm becomes: nothing (nn.Identity), or the parts that ran after the
    normalisation (timm's BatchNormAct2d: its dropout and activation). None: a kind not known here."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    children = dict(bn.named_children())
    if isinstance(bn, nn.BatchNorm2d) and set(children) == {"drop", "act"}:  # timm BatchNormAct2d
        return nn.Sequential(children["drop"], children["act"])
    return None


def _foldable_conv(conv: nn.Module) -> bool:
    if isinstance(conv, nn.ConvTranspose2d):  # weight (in, out / groups, kH, kW): one group keeps it simple
        return conv.groups == 1
    return isinstance(conv, nn.Conv2d)


def find_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], int]:
    """([(convolution name, BatchNorm name)], number of BatchNorm2d layers): the pairs where the BatchNorm
    reads exactly the convolution's output, each called once in a forward pass of `example`."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id of a convolution's output -> (conv, output)
    calls: dict[nn.Module, int] = {}
    found: list[tuple[nn.Module, nn.Module]] = []

    def on_conv(mod, _inputs, out):
        calls[mod] = calls.get(mod, 0) + 1
        outputs[id(out)] = (mod, out)  # the tensor is kept alive, so its id is not reused meanwhile

    def on_bn(mod, inputs, _out):
        calls[mod] = calls.get(mod, 0) + 1
        hit = outputs.get(id(inputs[0])) if inputs else None
        if hit is not None and hit[1] is inputs[0]:
            found.append((hit[0], mod))

    hooks, batchnorms = [], 0
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(mod.register_forward_hook(on_conv))
        elif isinstance(mod, nn.BatchNorm2d):
            batchnorms += 1
            hooks.append(mod.register_forward_hook(on_bn))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        outputs.clear()
    pairs = [(names[c], names[b]) for c, b in found
             if calls[c] == 1 and calls[b] == 1 and _foldable_conv(c) and not b.training
             and b.track_running_stats and b.running_var is not None and _replacement(b) is not None]
    return pairs, batchnorms


def folded_weights(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `conv` with `bn`'s eval-mode affine map moved in, computed in float64 and returned
    in the weight's dtype and memory layout; neither module changes."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
        dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
        shape = [1] * conv.weight.dim()
        shape[dim] = -1
        weight = torch.empty_like(conv.weight)  # keeps the layout (channels_last) of the weight
        weight.copy_(conv.weight.double() * scale.view(shape))
        return weight, (bias * scale + shift).to(conv.weight.dtype)


def fold_pair(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Move `bn`'s eval-mode affine map into `conv`'s weight and bias (in place; `bn` is left as it was)."""
    weight, bias = folded_weights(conv, bn)
    with torch.no_grad():
        conv.weight.copy_(weight)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _largest_change(before: Any, after: Any) -> float:
    """The largest |after - before| over the output tensors, relative to the largest |before| (inf if the
    structures differ)."""
    a, b = _tensors(before), _tensors(after)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        x, y = x.detach().double(), y.detach().double()
        scale = max(1.0, float(x.abs().max()))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> FoldResult:
    """A copy of `model` (in eval mode) with every BatchNorm2d that follows a convolution folded into it,
    checked on `example` (a prepared batch: one or two images are enough); see the module doc."""
    if model.training:
        raise ValueError("fold_batchnorm is for models in eval mode (BatchNorm uses batch statistics in training)")
    pairs, batchnorms = find_pairs(model, example)
    if not pairs:
        return FoldResult(model, 0, batchnorms)
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        fold_pair(folded.get_submodule(conv_name), bn)
        _set_submodule(folded, bn_name, _replacement(bn))
    with torch.no_grad():
        change = _largest_change(model(example), folded(example))
    if not change <= REL_TOLERANCE:
        return FoldResult(model, 0, batchnorms,
                          refused=f"the folded model's outputs moved by {change:.2g} of their scale on a test batch, "
                                  f"more than {REL_TOLERANCE:g}: a convolution's output is used besides its BatchNorm")
    return FoldResult(folded, len(pairs), batchnorms)


class FrozenFold:
    """BatchNorm folded into the convolution before it for the training forward, where both stay frozen for
    the whole run (`--freeze-early`: their parameters do not train and the BatchNorm runs in eval mode, so
    it is a fixed affine map). The modules' parameters and buffers are not touched, so checkpoints, the
    EMA and resuming see the model as built: each folded convolution's `forward` is routed to a shadow
    copy holding the folded weight and bias (computed once), each folded BatchNorm's `forward` to what
    runs after its normalisation (nothing, or timm's activation). `undo()` routes them back."""

    def __init__(self, model: nn.Module, example: torch.Tensor, frozen) -> None:
        frozen = set(frozen)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            pairs, self.batchnorms = find_pairs(model, example)
        finally:
            for m, training in modes.items():
                m.training = training
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        for conv_name, bn_name in pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            if conv not in frozen or bn not in frozen:
                continue
            if any(p.requires_grad for p in [*conv.parameters(), *bn.parameters()]):
                continue
            weight, bias = folded_weights(conv, bn)
            shadow = copy.copy(conv)  # same class and settings; its own parameters and no hooks
            shadow._parameters = {"weight": nn.Parameter(weight, requires_grad=False),
                                  "bias": nn.Parameter(bias, requires_grad=False)}
            shadow._forward_hooks, shadow._forward_pre_hooks = {}, {}
            conv.forward = shadow.forward
            bn.forward = _replacement(bn).forward
            self.pairs.append((conv, bn))

    def undo(self) -> None:
        for conv, bn in self.pairs:
            for m in (conv, bn):
                m.__dict__.pop("forward", None)
        self.pairs = []
