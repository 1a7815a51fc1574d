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

The table and the extractor classes are defined in `cnnkit.models.backbone_base`, below the weights
loader (which needs them) and the registry, and are importable from here as well.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.backbone_base import (_CNNKIT, BACKBONES, DEFAULT_OUT_INDICES, LEVEL_STRIDES,  # noqa: F401
                                         TOTAL_STRIDE, Backbone, BackboneSpec, FeatureInfo, PoolIndices,
                                         StageFeatures, TimmFeatures, _check_out_indices, _module_out_channels,
                                         _replace_first_conv, find_backbone, first_conv_name, get_backbone,
                                         list_backbones)
from cnnkit.models.inputs import check_int
from cnnkit.models.registry import get_entry, register_model
from cnnkit.models.weights import load_weights


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
        _drop_unused_stages(body)
        return TimmFeatures(body, name=spec.name, out_indices=indices, in_channels=in_channels)
    if spec.source == "cnnkit":
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


def _drop_unused_stages(body: nn.Module) -> None:
    """timm's EfficientNet / MobileNetV3 feature extractors run every block even when the deepest map
    asked for comes earlier (`out_indices=(3,)`: the stride-32 blocks run and are thrown away); keep only
    the blocks up to the last one whose output is returned (their own parameters stay the same)."""
    blocks, wanted = getattr(body, "blocks", None), getattr(body, "_stage_out_idx", None)
    if isinstance(blocks, nn.Sequential) and wanted and getattr(body, "feature_hooks", None) is None:
        last = max(int(i) for i in wanted)  # stage i is the output of blocks[i - 1] (0: the stem)
        if 0 < last < len(blocks):
            body.blocks = blocks[:last]


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
