"""What a backbone is, below the model registry and the weights loader: the table of backbones
(`BACKBONES`, `get_backbone`, `find_backbone`), the feature-extractor modules (`Backbone`,
`StageFeatures`, `TimmFeatures`, `FeatureInfo`, `PoolIndices`) and small helpers on module trees.

`cnnkit.models.weights` needs these to load ImageNet weights, and `cnnkit.models.backbones` (which
builds classifiers and feature extractors, and re-exports everything here) needs the weights loader;
keeping them apart lets both import this module and neither import the other back.
Feature levels: level i has stride 2**(i + 1), i = 0..4 (see `cnnkit.models.backbones`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.inputs import name_key

DEFAULT_OUT_INDICES = (1, 2, 3, 4)  # strides 4, 8, 16, 32
LEVEL_STRIDES = (2, 4, 8, 16, 32)  # stride of level i
TOTAL_STRIDE = 32


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: where it comes from and which ImageNet weights apply to it.

    `arch` is the builder name in the source library (timm model name, torchvision builder name, or
    the cnnkit registry name); `torchvision` names the torchvision builder whose weight enum
    (`torchvision.models.get_model_weights`) fits its state_dict keys, if any.
    """

    name: str
    source: str  # "cnnkit" | "timm" | "torchvision"
    arch: str
    description: str
    torchvision: str | None = None


_CNNKIT = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

BACKBONES: dict[str, BackboneSpec] = {}
for _name in _CNNKIT:
    BACKBONES[_name] = BackboneSpec(_name, "cnnkit", _name, f"cnnkit {_name}", torchvision=_name)
for _spec in (
    BackboneSpec("efficientnet_lite0", "timm", "tf_efficientnet_lite0",
                 "EfficientNet-Lite0 (Tan & Le 2019), timm tf_efficientnet_lite0; offline ImageNet weights"),
    BackboneSpec("efficientnet_b0", "timm", "efficientnet_b0", "EfficientNet-B0 (Tan & Le 2019), timm"),
    BackboneSpec("resnet18", "timm", "resnet18", "ResNet-18 (He et al. 2016), timm"),
    BackboneSpec("resnet50", "timm", "resnet50", "ResNet-50 (He et al. 2016), timm"),
    BackboneSpec("mobilenetv3_large_100", "timm", "mobilenetv3_large_100",
                 "MobileNetV3-Large 1.0 (Howard et al. 2019), timm"),
    BackboneSpec("tv_resnet18", "torchvision", "resnet18", "ResNet-18 (He et al. 2016), torchvision",
                 torchvision="resnet18"),
    BackboneSpec("tv_resnet50", "torchvision", "resnet50", "ResNet-50 (He et al. 2016), torchvision",
                 torchvision="resnet50"),
    BackboneSpec("tv_mobilenet_v3_large", "torchvision", "mobilenet_v3_large",
                 "MobileNetV3-Large (Howard et al. 2019), torchvision", torchvision="mobilenet_v3_large"),
    BackboneSpec("tv_efficientnet_b0", "torchvision", "efficientnet_b0",
                 "EfficientNet-B0 (Tan & Le 2019), torchvision", torchvision="efficientnet_b0"),
    BackboneSpec("tv_vgg16", "torchvision", "vgg16", "VGG-16 (Simonyan & Zisserman 2015), torchvision",
                 torchvision="vgg16"),
):
    BACKBONES[_spec.name] = _spec
_BY_KEY = {name_key(n): s for n, s in BACKBONES.items()}


def list_backbones(source: str | None = None) -> list[str]:
    """Names of the backbones, optionally of one source ("cnnkit", "timm" or "torchvision")."""
    return [n for n, s in BACKBONES.items() if source is None or s.source == source]


def get_backbone(name: str) -> BackboneSpec:
    """The spec of backbone `name`; an unknown name raises ModelError with the closest names."""
    spec = _BY_KEY.get(name_key(str(name)))
    if spec is None:
        close = difflib.get_close_matches(str(name).strip().lower(), list(BACKBONES), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(BACKBONES)}"
        raise ModelError(f"unknown backbone {name!r}", fix=hint)
    return spec


def find_backbone(name: str | None) -> BackboneSpec | None:
    """Like `get_backbone`, but None for a name that is no backbone."""
    return None if name is None else _BY_KEY.get(name_key(str(name)))


# --- small helpers on module trees --------------------------------------------------------------


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_submodule(root, parent), leaf, module)


def first_conv_name(model: nn.Module) -> str | None:
    """Module path of the first Conv2d in registration order (the layer that sees the image)."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first convolution for `in_channels` input channels (He-normal init, fan_out)."""
    path = first_conv_name(model)
    old = _get_submodule(model, path)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, 1, old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    _set_submodule(model, path, new)


def _module_stride(module: nn.Module) -> int:
    """Down-sampling factor of a module along its main path: the product of the strides of its
    convolutions and pools, leaving out ResNet shortcut projections (`downsample`)."""
    stride = 1
    for name, m in module.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            stride *= int(s)
    return stride


def _module_out_channels(module: nn.Module, channels: int) -> int:
    """Channels after `module`: out_channels of its last convolution, else `channels` unchanged."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else channels


# --- feature extractors -------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureInfo:
    """What a feature extractor returns: per output map, its level, channels and stride."""

    indices: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]


class PoolIndices(NamedTuple):
    """A max pool's argmax positions and the (H, W) of its input: what `F.max_unpool2d` needs,
    `F.max_unpool2d(x, p.indices, kernel, stride, output_size=p.input_size)` (SegNet's decoder)."""

    indices: torch.Tensor
    input_size: tuple[int, int]


def _check_out_indices(out_indices, available: Iterable[int], name: str) -> tuple[int, ...]:
    available = sorted(available)
    given = list(out_indices) if isinstance(out_indices, (list, tuple)) else [out_indices]
    if not given or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        raise ModelError(f"out_indices must be a non-empty list of ints, got {out_indices!r}")
    wanted = sorted(set(given))
    levels = ", ".join(f"{i} (stride {LEVEL_STRIDES[i]})" for i in available)
    if any(i not in available for i in wanted):
        raise ModelError(f"backbone {name} has no feature level {out_indices!r}",
                         fix=f"choose out_indices among {levels}")
    return tuple(wanted)


class Backbone(nn.Module):
    """Base of the feature extractors: `forward(x)` returns a list of maps (see `feature_info`)."""

    feature_info: FeatureInfo
    in_channels: int
    min_input_size: int
    cnnkit_backbone: str

    @property
    def channels(self) -> tuple[int, ...]:
        return self.feature_info.channels

    @property
    def strides(self) -> tuple[int, ...]:
        return self.feature_info.strides

    def weights_target(self) -> nn.Module:
        """The module whose state_dict keys match the source classifier's checkpoint keys."""
        return self


class StageFeatures(Backbone):
    """Feature maps tapped from a chain of layers run in order (cnnkit and torchvision backbones).

    `parts` are (name, module, unroll) triples adopted under their own names, so state_dict keys stay
    those of the classifier; an unrolled part (an nn.Sequential such as VGG's `features`) contributes
    its children to the chain. The tap for stride s is the last layer of the chain that runs at stride
    s; the chain is cut after the last tap that is needed.

    With `return_indices=True`, every nn.MaxPool2d of the chain also returns its argmax positions and
    `forward` returns `(features, pools)`, `pools` a list of `PoolIndices`, one per max pool in order.
    """

    def __init__(self, parts: Sequence[tuple[str, nn.Module, bool]], *, name: str, out_indices,
                 in_channels: int, min_input_size: int, return_indices: bool = False):
        super().__init__()
        chain: list[tuple[str, nn.Module]] = []
        for part_name, module, unroll in parts:
            chain += [(part_name, m) for m in module.children()] if unroll else [(part_name, module)]
        stride, channels = 1, in_channels
        level_at: dict[int, tuple[int, int]] = {}  # level -> (chain position, channels)
        for pos, (_, layer) in enumerate(chain):
            stride *= _module_stride(layer)
            channels = _module_out_channels(layer, channels)
            if stride in LEVEL_STRIDES:
                level_at[LEVEL_STRIDES.index(stride)] = (pos, channels)
        indices = _check_out_indices(out_indices, level_at, name)
        if return_indices and not any(isinstance(m, nn.MaxPool2d) for _, m in chain):
            raise ModelError(f"backbone {name} has no max pooling, so return_indices=True does not apply",
                             fix="use a VGG or AlexNet backbone for max-unpooling")
        last = len(chain) - 1 if return_indices else max(level_at[i][0] for i in indices)
        chain = chain[: last + 1]
        if return_indices:  # the pools are called as modules, so forward hooks (`cnnkit info`) see them
            for _, layer in chain:
                if isinstance(layer, nn.MaxPool2d):
                    layer.return_indices = True
        for part_name, module, unroll in parts:
            kept = [m for n, m in chain if n == part_name]
            if not kept:
                continue
            self.add_module(part_name, nn.Sequential(*kept) if unroll else module)
        self._chain = [m for _, m in chain]
        self._taps = {level_at[i][0]: i for i in indices}
        self.feature_info = FeatureInfo(indices, tuple(level_at[i][1] for i in indices),
                                        tuple(LEVEL_STRIDES[i] for i in indices))
        self.return_indices = return_indices
        self.in_channels = in_channels
        self.min_input_size = min_input_size
        self.cnnkit_backbone = name

    def forward(self, x: torch.Tensor):
        features: list[torch.Tensor] = []
        pools: list[PoolIndices] = []
        for pos, layer in enumerate(self._chain):
            if self.return_indices and isinstance(layer, nn.MaxPool2d):
                size = (int(x.shape[-2]), int(x.shape[-1]))
                x, idx = layer(x)  # return_indices=True (set in __init__)
                pools.append(PoolIndices(idx, size))
            else:
                x = layer(x)
            if pos in self._taps:
                features.append(x)
        return (features, pools) if self.return_indices else features


class TimmFeatures(Backbone):
    """A timm model built with `features_only=True` (in `body`, so keys read `body.<timm key>`)."""

    def __init__(self, body: nn.Module, *, name: str, out_indices: tuple[int, ...], in_channels: int):
        super().__init__()
        self.body = body
        info = body.feature_info
        self.feature_info = FeatureInfo(tuple(out_indices), tuple(int(c) for c in info.channels()),
                                        tuple(int(r) for r in info.reduction()))
        self.return_indices = False
        self.in_channels = in_channels
        self.min_input_size = TOTAL_STRIDE
        self.cnnkit_backbone = name

    def weights_target(self) -> nn.Module:
        return self.body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))

