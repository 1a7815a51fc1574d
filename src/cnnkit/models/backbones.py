"""ImageNet backbones for transfer learning: one table, two uses.

Every backbone is (a) a classifier registered in the model registry, so
`build_model("efficientnet_lite0", num_classes=10, weights="imagenet")` works, and (b) a feature
extractor, `build_backbone(name, out_indices=(1, 2, 3, 4))`, that returns a list of feature maps.

Names (`list_backbones()`; the registry ignores case, '-' and '_'):

=======================  ===========  ==============================================================
name                     source       architecture
=======================  ===========  ==============================================================
alexnet                  cnnkit       AlexNet (Krizhevsky et al. 2012), `cnnkit.models.alexnet`
vgg11 ... vgg19_bn       cnnkit       VGG-11/13/16/19 (+ BN) (Simonyan & Zisserman 2015)
efficientnet_lite0       timm         `tf_efficientnet_lite0`: EfficientNet-Lite0 (Tan & Le 2019,
                                      "EfficientNet: Rethinking Model Scaling for CNNs", ICML; Lite:
                                      no squeeze-excitation, ReLU6), offline ImageNet weights
efficientnet_b0          timm         `efficientnet_b0` (Tan & Le 2019)
resnet18, resnet50       timm         ResNet (He et al. 2016, "Deep Residual Learning")
mobilenetv3_large_100    timm         MobileNetV3-Large 1.0 (Howard et al. 2019)
tv_resnet18, tv_resnet50 torchvision  torchvision's ResNet-18/50
tv_mobilenet_v3_large    torchvision  torchvision's MobileNetV3-Large
tv_efficientnet_b0       torchvision  torchvision's EfficientNet-B0
tv_vgg16                 torchvision  torchvision's VGG-16 (same keys as cnnkit's vgg16)
=======================  ===========  ==============================================================

Classifiers share timm's interface: `forward_features`, `forward_head(x, pre_logits=False)`,
`get_classifier()`, `reset_classifier(num_classes)`, `num_features`, plus `in_channels` (1 for
grayscale: the first convolution is rebuilt, and pretrained weights adapted to it) and
`min_input_size`. State_dict keys are those of the source library, so its checkpoints load unchanged.

Feature levels: level i has stride 2**(i + 1), i = 0..4 (strides 2, 4, 8, 16, 32: timm's
`out_indices`). timm backbones use `features_only=True`. For the others a level is the output of the
last layer that runs at that stride: for VGG and AlexNet the activation just before each max pool (the
stride-32 level is the output of the last pool), for torchvision's ResNet the stem and `layer1..4`.
AlexNet has no stride-2 level (its first convolution has stride 4). `feature_info` (channels and
strides of the returned maps) is known without a forward pass.

Freezing: `backbone_parameters(model)` / `head_parameters(model)` split a model's parameters; the head
is what `forward_head` runs (see `head_parameters`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.inputs import check_int
from cnnkit.models.registry import _normalise, register_model

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
_BY_KEY = {_normalise(n): s for n, s in BACKBONES.items()}


def list_backbones(source: str | None = None) -> list[str]:
    """Names of the backbones, optionally of one source ("cnnkit", "timm" or "torchvision")."""
    return [n for n, s in BACKBONES.items() if source is None or s.source == source]


def get_backbone(name: str) -> BackboneSpec:
    """The spec of backbone `name`; an unknown name raises ModelError with the closest names."""
    spec = _BY_KEY.get(_normalise(str(name)))
    if spec is None:
        close = difflib.get_close_matches(str(name).strip().lower(), list(BACKBONES), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(BACKBONES)}"
        raise ModelError(f"unknown backbone {name!r}", fix=hint)
    return spec


def find_backbone(name: str | None) -> BackboneSpec | None:
    """Like `get_backbone`, but None for a name that is no backbone."""
    return None if name is None else _BY_KEY.get(_normalise(str(name)))


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


# --- classifiers: timm and torchvision models behind one interface ------------------------------

def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        raise ModelError("timm is not installed", fix="pip install 'timm>=0.9'") from None
    return timm


def _build_timm(spec: BackboneSpec, *, num_classes: int = 1000, in_channels: int = 3,
                dropout: float | None = None, drop_path: float | None = None) -> nn.Module:
    check_int(num_classes, "num_classes", 0)
    check_int(in_channels, "in_channels", 1)
    options = {}
    if dropout is not None:
        options["drop_rate"] = float(dropout)
    if drop_path is not None:
        options["drop_path_rate"] = float(drop_path)
    model = _timm().create_model(spec.arch, pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **options)
    model.in_channels = in_channels
    model.min_input_size = TOTAL_STRIDE
    model.cnnkit_backbone = spec.name
    return model


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model with timm's interface, its state_dict keys unchanged.

    The model's top-level children are adopted under their own names; `body` names the ones
    `forward_features` runs in order, `pool` the global pool and `head` the classifier (a Linear, or
    a Sequential ending in one; the layers before the last are the `pre_logits` part).
    """

    def __init__(self, net: nn.Module, *, body: Sequence[str], pool: str, head: str,
                 in_channels: int, num_classes: int):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        self._body, self._pool, self._head = tuple(body), pool, head
        channels = 3
        for name in self._body:
            channels = _module_out_channels(getattr(self, name), channels)
        self.num_features = channels
        self.head_hidden_size = self._last_linear().in_features
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.min_input_size = TOTAL_STRIDE
        if num_classes == 0:
            self._set_last(nn.Identity())

    def _last_linear(self) -> nn.Module:
        head = getattr(self, self._head)
        return head[-1] if isinstance(head, nn.Sequential) else head

    def _set_last(self, layer: nn.Module) -> None:
        head = getattr(self, self._head)
        if isinstance(head, nn.Sequential):
            head[-1] = layer
        else:
            setattr(self, self._head, layer)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._body:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(getattr(self, self._pool)(x), 1)
        head = getattr(self, self._head)
        layers = list(head) if isinstance(head, nn.Sequential) else [head]
        for layer in layers[:-1]:
            x = layer(x)
        return x if pre_logits else layers[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self._last_linear()

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh last layer with `num_classes` outputs (N(0, 0.01) weights, zero bias; 0: none)."""
        check_int(num_classes, "num_classes", 0)
        ref = next(self.parameters())
        if num_classes:
            layer = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)
        else:
            layer = nn.Identity()
        self._set_last(layer)
        self.num_classes = num_classes


# torchvision families: (body children, global pool, head)
_TV_LAYOUT = {
    "resnet": (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), "avgpool", "fc"),
    "features": (("features",), "avgpool", "classifier"),
}


def _tv_layout(arch: str) -> tuple:
    return _TV_LAYOUT["resnet" if arch.startswith(("resnet", "resnext", "wide_resnet")) else "features"]


def _build_torchvision_net(spec: BackboneSpec, in_channels: int, num_classes: int = 1000) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(spec.arch, weights=None, num_classes=max(num_classes, 1))
    if in_channels != 3:
        _replace_first_conv(net, in_channels)
    return net


def _build_torchvision(spec: BackboneSpec, *, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    check_int(num_classes, "num_classes", 0)
    check_int(in_channels, "in_channels", 1)
    net = _build_torchvision_net(spec, in_channels, num_classes)
    body, pool, head = _tv_layout(spec.arch)
    model = TorchvisionClassifier(net, body=body, pool=pool, head=head, in_channels=in_channels,
                                  num_classes=num_classes)
    model.cnnkit_backbone = spec.name
    return model


def _register(spec: BackboneSpec) -> None:
    if spec.source == "timm":
        def builder(**kwargs):
            return _build_timm(spec, **kwargs)
        builder.__doc__ = (f"{spec.description}. Options: num_classes, in_channels, dropout, drop_path.")
    else:
        def builder(**kwargs):
            return _build_torchvision(spec, **kwargs)
        builder.__doc__ = f"{spec.description}. Options: num_classes, in_channels."
    builder.__name__ = spec.name
    register_model(spec.name, description=spec.description)(builder)


for _spec in BACKBONES.values():
    if _spec.source != "cnnkit":  # AlexNet and VGG register themselves in their own modules
        _register(_spec)


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


def _make_backbone(spec: BackboneSpec, out_indices, in_channels: int, return_indices: bool,
                   width: float = 1.0) -> Backbone:
    if width != 1 and spec.source != "cnnkit":
        raise ModelError(f"backbone {spec.name} has no width option (width={width!r})",
                         fix=f"use width=1, or a cnnkit backbone ({', '.join(_CNNKIT)})")
    if spec.source == "timm":
        if return_indices:
            raise ModelError(f"return_indices=True needs max pooling; backbone {spec.name} has none "
                             f"exposed", fix="use a VGG or AlexNet backbone for max-unpooling")
        indices = _check_out_indices(out_indices, range(len(LEVEL_STRIDES)), spec.name)
        body = _timm().create_model(spec.arch, pretrained=False, features_only=True,
                                    out_indices=indices, in_chans=in_channels)
        if tuple(body.feature_info.reduction()) != tuple(LEVEL_STRIDES[i] for i in indices):
            raise ModelError(f"timm {spec.arch} has unexpected feature strides "  # pragma: no cover
                             f"{body.feature_info.reduction()}")
        return TimmFeatures(body, name=spec.name, out_indices=indices, in_channels=in_channels)
    if spec.source == "cnnkit":
        from cnnkit.models.registry import get_entry

        # The small classifier (pool 1x1) only carries the convolutional part, which is kept.
        net = get_entry(spec.name).builder(num_classes=0, pool_size=1, in_channels=in_channels, width=width)
        parts = [("features", net.features, True)]
        smallest = net.min_input_size
    else:
        net = _build_torchvision_net(spec, in_channels)
        body, _, _ = _tv_layout(spec.arch)
        parts = [(n, getattr(net, n), n == "features") for n in body]
        smallest = TOTAL_STRIDE
    return StageFeatures(parts, name=spec.name, out_indices=out_indices, in_channels=in_channels,
                         min_input_size=smallest, return_indices=return_indices)


def build_backbone(name: str, weights=None, *, out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
                   in_channels: int = 3, return_indices: bool = False, width: float = 1.0,
                   download: bool = False, log=print) -> Backbone:
    """A feature extractor: `backbone(x)` returns a list of maps at the strides of `out_indices`.

    Args:
        name: a backbone of `list_backbones()`.
        weights: None (random init), "imagenet", a torchvision weight name or a weights file, as for
            `cnnkit.models.weights.load_weights`; the classifier's head tensors are not used.
        out_indices: feature levels, level i at stride 2**(i+1); the default gives strides 4..32.
        in_channels: image channels; pretrained first-convolution weights are adapted.
        return_indices: VGG/AlexNet only: `forward` returns `(features, pools)` with one
            `PoolIndices` per max pool, for `F.max_unpool2d`.
        width: channel width multiplier of the cnnkit backbones (AlexNet, VGG); a thin backbone
            cannot take ImageNet weights. Other sources take only 1.
        download: allow downloading weights that are not cached.
        log: receives the one-line weights report.

    `backbone.feature_info` (also `.channels`, `.strides`) describes the outputs.
    """
    spec = get_backbone(name)
    check_int(in_channels, "in_channels", 1)
    backbone = _make_backbone(spec, out_indices, in_channels, bool(return_indices), width)
    if weights is not None:
        from cnnkit.models.weights import load_weights

        load_weights(backbone, weights, arch=spec.name, download=download, log=log)
    return backbone


def backbone_feature_info(name: str, out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
                          in_channels: int = 3) -> FeatureInfo:
    """Channels and strides of `build_backbone(name, out_indices=...)`, without a forward pass
    (the extractor is built on the meta device: no memory, no initialisation arithmetic)."""
    spec = get_backbone(name)
    with torch.device("meta"):
        return _make_backbone(spec, out_indices, in_channels, False).feature_info


def backbone_channels(name: str, out_indices: Sequence[int] = DEFAULT_OUT_INDICES) -> tuple[int, ...]:
    return backbone_feature_info(name, out_indices).channels


def backbone_strides(name: str, out_indices: Sequence[int] = DEFAULT_OUT_INDICES) -> tuple[int, ...]:
    return backbone_feature_info(name, out_indices).strides


# --- backbone / head split for freezing ---------------------------------------------------------

def _called_modules(model: nn.Module, run) -> list[nn.Module]:
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: called.append(mod)) for m in model.modules()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return called


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = model._modules.get("module") if isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model._modules.get("_orig_mod")
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the head (see `head_parameters`)."""
    model = _unwrap(model)
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        inside = set(backbone.modules())
        return [m for m in model.modules() if m not in inside and m is not model]
    if isinstance(model, Backbone):
        return []
    if hasattr(model, "forward_head") and hasattr(model, "num_features"):
        ref = next(iter(model.parameters()), None)
        x = torch.zeros(1, int(model.num_features), 1, 1, device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
        try:
            called = _called_modules(model, lambda: model.forward_head(x))
        except Exception:  # noqa: BLE001 - an unusual head: fall back to the classifier alone
            called = []
        if called:
            return list(dict.fromkeys(called))
    if hasattr(model, "get_classifier"):
        return [model.get_classifier()]
    return []


def head_parameters(model: nn.Module, *, last_layer_only: bool = False) -> list[nn.Parameter]:
    """Parameters of the head: what trains when the backbone is frozen.

    The head is, in order of precedence: everything outside a `model.backbone` submodule (detection
    and segmentation models that hold a backbone); for a classifier, the layers `forward_head` runs
    (timm's split: the classifier of EfficientNet and ResNet; `conv_head` + classifier of
    MobileNetV3; all three fully connected layers of AlexNet and VGG; the `classifier` Sequential of
    torchvision's MobileNetV3/EfficientNet/VGG); nothing for a feature extractor.
    `last_layer_only=True` gives just `get_classifier()`'s parameters.
    """
    inner = _unwrap(model)
    if last_layer_only and hasattr(inner, "get_classifier"):
        return list(inner.get_classifier().parameters())
    seen: set[int] = set()
    params = []
    for m in head_modules(model):
        for p in m.parameters(recurse=True):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not in `head_parameters(model)`, in `model.parameters()` order."""
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def early_layers(model: nn.Module, max_stride: int) -> list[nn.Module]:
    """The backbone layers that run at stride <= `max_stride`: every parameter-holding layer whose output
    is at most `max_stride` times smaller than the image, in the order the forward pass calls them,
    up to the first layer past that stride.

    Found with one forward pass of a blank image through the backbone (a detector's or segmenter's
    `model.backbone`, a classifier's `forward_features`), so it holds for every registry backbone.
    Layers whose output is 1 x 1 while the image is larger (squeeze-excitation) belong to the block
    they sit in. These are the layers detectron2's `FREEZE_AT` keeps frozen in transfer learning: the
    generic ImageNet edges and textures, and the most expensive layers to back-propagate through.
    """
    check_int(max_stride, "max_stride", 1)
    inner = _unwrap(model)
    body = getattr(inner, "backbone", None)
    run = body if isinstance(body, nn.Module) else inner
    call = getattr(inner, "forward_features", None) if run is inner and not isinstance(inner, Backbone) else None
    backbone_ids = {id(p) for p in backbone_parameters(inner)}
    ref = next(iter(inner.parameters()), None)
    conv = next((m for m in run.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else int(getattr(run, "in_channels", 3))
    size = max(64, 2 * int(getattr(run, "min_input_size", 32) or 32))
    x = torch.zeros(1, channels, size, size, device=ref.device if ref is not None else None)
    called: list[tuple[nn.Module, int]] = []

    def hook(module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            w = int(out.shape[-1])
            called.append((module, 0 if w == 1 else max(1, round(size / w))))

    owners = [m for m in run.modules()
              if any(id(p) in backbone_ids for p in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in owners]
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            (call or run)(x)
    finally:
        for h in handles:
            h.remove()
        inner.train(was_training)
    early: list[nn.Module] = []
    for module, stride in called:
        if stride > max_stride:
            break
        if module not in early:
            early.append(module)
    return early
