"""YOLO (version 1): Redmon, Divvala, Girshick & Farhadi, "You Only Look Once: Unified, Real-Time
Object Detection", CVPR 2016.

The image is divided into an S x S grid. Each grid cell predicts B boxes, each with (x, y, w, h) and a
confidence Pr(Object) * IoU(pred, truth), and C conditional class probabilities Pr(Class_i | Object)
(Section 2). One forward pass gives all of them as an S x S x (5B + C) tensor; on PASCAL VOC the paper
uses S = 7, B = 2, C = 20 (7 x 7 x 30) at 448 x 448 input.

Models (all registered with task "detect"):

=============  =====================================================================================
name           network
=============  =====================================================================================
yolov1         Figure 3: 24 convolutional layers (20 "pretrained" ones + the 4 added for detection,
               Section 2.2) and 2 fully connected layers (4096, S*S*(5B+C)); leaky ReLU 0.1, dropout
               0.5 after the first FC layer. 271.7 M parameters at 448 (205 M of them in the first
               FC layer, which sees 7 x 7 x 1024 features).
yolov1_fast    Fast YOLO (Section 2, "9 convolutional layers instead of 24, fewer filters"): see
               `FAST_YOLO_FEATURES` for the layer table followed, then the same FC head.
yolov1_vgg16   The paper's VGG-16 variant (Section 4.1, Table 1): VGG-16's 13 convolutional layers
               (`model.backbone`, torchvision keys, so "imagenet" / VGG16_Weights.* load into it), then
               the 4 detection convolutions and the FC head of `yolov1`.
yolo           The YOLO output on any registered backbone (`cnnkit.models.backbones`): the stride-32
               map of `build_backbone(name, out_indices=(4,))` (`model.backbone`), then a small fully
               convolutional head (3x3 conv + BN + leaky ReLU twice, adaptive average pool to S x S,
               1x1 conv to 5B + C channels per cell).
=============  =====================================================================================

Output: every model returns the raw tensor `[N, S, S, 5B + C]`; `out[n, i, j]` is the cell in row i
(y) and column j (x). Per cell, B groups of 5 values (x, y, sqrt w, sqrt h, confidence), then C class
scores. As in the paper ("we use a linear activation function for the final layer", Section 2.2) the
box values come out of a linear layer and are read as they are, in exactly one place,
`cnnkit.tasks.yolo.split_output`:

    x, y       centre offset inside the cell (target in [0, 1])
    sqrt(w/h)  square roots of width and height relative to the image (targets in [0, 1]): the
               paper's loss compares sqrt(w), sqrt(h), so the network predicts the roots directly and
               no square root of a prediction is ever taken (w = sqrt(w)^2 >= 0 always)
    conf       Pr(Object) * IoU(pred, truth) (target in [0, 1])
    P(c|obj)   softmax of the class scores: one distribution per cell, shared by its B boxes

Linear outputs keep the squared-error loss's gradient 2 (prediction - target) from vanishing: with a
sigmoid in front, predictors saturated (sigmoid ~1e-9) and stopped learning. Boxes and scores are
clamped to [0, 1] when read (`YoloOutput.boxes()`, `.confidence()`).

Grid and size: `S`, `B`, `num_classes` and `img_size` are constructor arguments stored as attributes
of the same names; by default S = img_size // stride (stride 64 for the FC models, 7 at 448; 32 for
`yolo`). The FC models size their first FC layer from the feature map at `img_size`; an adaptive
average pool to that size (the identity at `img_size`) lets other input sizes run too (decode them
with their own size: the predictions are relative to the cell and the image).

`batch_norm=True` (not in the paper; YOLOv2 added it) puts BatchNorm after every convolution of the
FC models, which lets thin `width` variants train from scratch at higher learning rates. With only a
handful of images per batch its eval-mode statistics lag the batch statistics; the overfit test in
tests/tasks/test_yolo.py therefore uses the paper's network without it.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from cnnkit.errors import ModelError, ShapeError
from cnnkit.models.alexnet import FC_WIDTH, scaled
from cnnkit.models.backbones import Backbone, StageFeatures, build_backbone
from cnnkit.models.inputs import check_image_batch, check_int, check_width
from cnnkit.models.registry import register_model
from cnnkit.models.summary import smallest_input_size, window_geometry
from cnnkit.models.vgg import init_layer
from cnnkit.ops.sizes import conv_output_size

LEAKY_SLOPE = 0.1  # "leaky rectified linear activation", phi(x) = x if x > 0 else 0.1 x (Section 2.2)
BOX_VALUES = 5  # x, y, sqrt w, sqrt h, confidence per predictor

# A layer table entry is (out_channels, kernel, stride) for a convolution (padding kernel // 2)
# followed by leaky ReLU, or "M" for a 2x2 stride-2 max pool.
Layer = Union[tuple, str]

# Figure 3, the first 20 convolutional layers: the part the paper pretrains on ImageNet (Section 2.2).
YOLOV1_FEATURES: tuple[Layer, ...] = (
    (64, 7, 2), "M",
    (192, 3, 1), "M",
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
    *((256, 1, 1), (512, 3, 1)) * 4, (512, 1, 1), (1024, 3, 1), "M",
    *((512, 1, 1), (1024, 3, 1)) * 2,
)
# Figure 3, the 4 convolutional layers "added" for detection (Section 2.2); the second has stride 2.
DETECTION_CONVS: tuple[Layer, ...] = ((1024, 3, 1), (1024, 3, 2), (1024, 3, 1), (1024, 3, 1))
# Fast YOLO: the paper gives only "9 convolutional layers ... and fewer filters". The authors' released
# darknet config (cfg/yolov1-tiny.cfg) has 3x3 layers of 16-32-64-128-256-512 filters, each followed
# by a 2x2 max pool, then 1024 and 256 and one FC layer. We keep its six pooled layers and, to reach the
# paper's count of 9, end with three 3x3x1024 layers, followed by the same FC head as YOLO.
FAST_YOLO_FEATURES: tuple[Layer, ...] = (
    (16, 3, 1), "M", (32, 3, 1), "M", (64, 3, 1), "M", (128, 3, 1), "M", (256, 3, 1), "M",
    (512, 3, 1), "M", (1024, 3, 1), (1024, 3, 1), (1024, 3, 1),
)
FC_STRIDE = 64  # total stride of the FC models' feature map (448 -> 7)
CONV_HEAD_STRIDE = 32  # stride of the backbone map the `yolo` head reads by default (level 4)
HEAD_STRIDES = {8: 2, 16: 3, 32: 4}  # `yolo`'s stride option -> the backbone level read (stride 2 ** (level + 1))


def make_conv_layers(table: Sequence[Layer], *, in_channels: int, width: float = 1.0,
                     batch_norm: bool = False) -> tuple[nn.Sequential, int]:
    """A flat Sequential of [conv (+ BN) + leaky ReLU 0.1] / max-pool layers from a layer table, and
    its output channels. Convolutions have no bias when batch norm follows them."""
    layers: list[nn.Module] = []
    channels = in_channels
    for entry in table:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels, kernel, stride = entry
        out_channels = scaled(out_channels, width)
        layers.append(nn.Conv2d(channels, out_channels, kernel, stride, padding=kernel // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        channels = out_channels
    return nn.Sequential(*layers), channels


def feature_size(layers: Sequence[nn.Module], size: int) -> int:
    """Spatial size after the sliding-window layers of `layers` (in order) for a size x size input;
    ShapeError when a window does not fit."""
    for layer in layers:
        geometry = window_geometry(layer)
        if geometry is None:
            continue
        g = geometry.height
        size = size if geometry.same_padding else conv_output_size(size, g.kernel_size, g.stride, g.padding,
                                                                   g.dilation, geometry.ceil_mode)
    return size




def _init_weights(module: nn.Module) -> None:
    """He-normal (leaky ReLU 0.1) convolutions, N(0, 0.01) FC layers, zero biases, BN 1 / 0."""
    for m in module.modules():
        init_layer(m, LEAKY_SLOPE)


class YoloDetector(nn.Module):
    """What every YOLO model shares: the grid (`S`, `B`, `num_classes`, `img_size`, `stride`), the
    input check, and the output layout `[N, S, S, 5B + C]` (see the module doc).

    Subclasses call `_set_grid` once in their constructor, build their layers, and implement
    `forward_features` and `forward_head`.
    """

    S: int
    B: int
    num_classes: int
    img_size: int
    stride: int
    in_channels: int
    min_input_size: int

    def _set_grid(self, *, num_classes: int, S: int | None, B: int, img_size: int, stride: int,
                  in_channels: int) -> None:
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.B = check_int(B, "B (boxes per cell)", 1)
        self.img_size = check_int(img_size, "img_size", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.stride = stride
        self.S = check_int(S, "S (grid size)", 1) if S is not None else max(1, img_size // stride)

    @property
    def outputs_per_cell(self) -> int:
        """5B + C: B boxes of (x, y, sqrt w, sqrt h, confidence), then C class scores."""
        return BOX_VALUES * self.B + self.num_classes

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ShapeError unless x is (N, in_channels, H, W) with H, W >= min_input_size."""
        check_image_batch(x, name=getattr(self, "cnnkit_name", type(self).__name__), in_channels=self.in_channels,
                          min_size=self.min_input_size, size_fix=f"resize the images to {self.img_size}x{self.img_size}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw predictions `[N, S, S, 5B + C]` (decode with `cnnkit.tasks.yolo`)."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"S={self.S}, B={self.B}, num_classes={self.num_classes}, img_size={self.img_size}"


class YOLOv1(YoloDetector):
    """YOLO with the paper's fully connected head (Redmon et al. 2016, Figure 3).

    `forward_features`: features (convolutions; `model.backbone` for "vgg16"). `forward_head`: neck
    (the 4 detection convolutions, or none) -> adaptive average pool to the map size at `img_size`
    (identity there) -> FC (hidden) + leaky ReLU + dropout -> FC S*S*(5B+C) -> [N, S, S, 5B+C].
    The split is the paper's (Section 2.2): the first 20 convolutions are pretrained as a classifier,
    the 4 convolutions and 2 FC layers added for detection form the head, which
    `cnnkit.models.backbones.head_parameters` returns (what trains with a frozen backbone).

    Args:
        arch: "yolov1" (Figure 3, 24 conv layers), "fast" (Fast YOLO, 9 conv layers) or "vgg16"
            (VGG-16's convolutions as `model.backbone`, then the 4 detection convolutions).
        num_classes: C (20 for PASCAL VOC).
        S: grid size; default img_size // 64 (7 at 448).
        B: boxes per cell (2).
        img_size: the square input size the FC layer is sized for (448).
        in_channels: image channels.
        width: multiplies every convolution's channels and the FC hidden width (VGG's too).
        batch_norm: BatchNorm after every convolution (VGG-16-BN for "vgg16"); the paper has none.
        dropout: after the first FC layer (0.5, Section 2.2).
        fc_hidden: units of the hidden FC layer (4096); 0 connects the features straight to the
            output, as darknet's yolov1-tiny.cfg does.
    """

    def __init__(self, arch: str = "yolov1", *, num_classes: int = 20, S: int | None = None, B: int = 2,
                 img_size: int = 448, in_channels: int = 3, width: float = 1.0, batch_norm: bool = False,
                 dropout: float = 0.5, fc_hidden: int = FC_WIDTH):
        super().__init__()
        self._set_grid(num_classes=num_classes, S=S, B=B, img_size=img_size, stride=FC_STRIDE,
                       in_channels=in_channels)
        width = check_width(width)
        check_int(fc_hidden, "fc_hidden", 0)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ModelError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.arch = arch
        self.batch_norm = bool(batch_norm)
        if arch == "yolov1":
            self.features, channels = make_conv_layers(YOLOV1_FEATURES, in_channels=in_channels, width=width,
                                                       batch_norm=batch_norm)
            body: list[nn.Module] = list(self.features)
        elif arch == "fast":
            self.features, channels = make_conv_layers(FAST_YOLO_FEATURES, in_channels=in_channels, width=width,
                                                       batch_norm=batch_norm)
            body = list(self.features)
        elif arch == "vgg16":
            self.backbone = _vgg16_backbone(in_channels=in_channels, width=width, batch_norm=batch_norm)
            channels = self.backbone.channels[-1]
            body = list(self.backbone.modules())
        else:
            raise ModelError(f"unknown YOLOv1 architecture {arch!r}", fix="use 'yolov1', 'fast' or 'vgg16'")
        self.num_features = channels
        if arch in ("yolov1", "vgg16"):
            self.neck, channels = make_conv_layers(DETECTION_CONVS, in_channels=channels, width=width,
                                                   batch_norm=batch_norm)
        else:
            self.neck = nn.Sequential()
        layers = body + list(self.neck)
        self.min_input_size = smallest_input_size(layers)
        if img_size < self.min_input_size:
            raise ShapeError(f"img_size {img_size} is too small for this network",
                             fix=f"use img_size >= {self.min_input_size}")
        size = feature_size(layers, img_size)
        self.pool = nn.AdaptiveAvgPool2d(size)
        hidden = scaled(fc_hidden, width) if fc_hidden else 0
        outputs = self.S * self.S * self.outputs_per_cell
        if hidden:
            self.head = nn.Sequential(nn.Flatten(1), nn.Linear(channels * size * size, hidden),
                                      nn.LeakyReLU(LEAKY_SLOPE, inplace=True), nn.Dropout(dropout),
                                      nn.Linear(hidden, outputs))
        else:
            self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), nn.Linear(channels * size * size, outputs))
        _init_weights(self.head)
        _init_weights(self.neck)
        if arch != "vgg16":
            _init_weights(self.features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map of the feature extractor (the part the paper pretrains), (N, num_features, h, w)."""
        self.check_input(x)
        return self.backbone(x)[-1] if self.arch == "vgg16" else self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The detection layers (the 4 added convolutions and the 2 FC layers): features -> output."""
        out = self.head(self.pool(self.neck(x)))
        return out.view(out.shape[0], self.S, self.S, self.outputs_per_cell)


def _vgg16_backbone(*, in_channels: int, width: float, batch_norm: bool) -> Backbone:
    """VGG-16's convolutional part as a stride-32 feature extractor with torchvision's keys
    (`features.N.*`); `width` != 1 gives a thinner VGG-16 (ImageNet weights then do not fit)."""
    from cnnkit.models.vgg import VGG

    name = "vgg16_bn" if batch_norm else "vgg16"
    vgg = VGG("D", batch_norm=batch_norm, num_classes=0, pool_size=1, in_channels=in_channels, width=width)
    return StageFeatures([("features", vgg.features, True)], name=name, out_indices=(4,),
                         in_channels=in_channels, min_input_size=vgg.min_input_size)


def conv_bn_leaky(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]


class YOLO(YoloDetector):
    """The YOLO output on a registered backbone, with a fully convolutional head.

    backbone (its stride-32 map, `build_backbone(name, out_indices=(4,))`; `stride=16` reads the stride-16
    map and leaves the backbone's last stage out) -> [3x3 conv + BN + leaky ReLU 0.1] x 2 -> adaptive
    average pool to S x S (the identity when the map already is S x S) -> 1x1 conv to 5B + C channels ->
    permuted to [N, S, S, 5B + C]. Each cell is predicted from the features at its own place, the role
    the paper's FC layers play with a global view.

    Args:
        backbone: a name of `cnnkit.models.backbones.list_backbones()` (efficientnet_lite0).
        num_classes, B, img_size, in_channels: as `YOLOv1`.
        S: grid size; default img_size // stride (the map read: 14 at 448, 7 at 224 with stride 32).
        width: multiplies the head's channels (the backbone is as registered).
        stride: the backbone map the head reads: 32 (default), 16 or 8. A finer map gives a finer grid
            (S = 10 instead of 5 at 160 px), so more objects that lie close together each get a cell of
            their own, and runs fewer backbone layers; each cell then sees less context.
        head_channels: channels of the two 3x3 convolutions of the head (256).

    `build_model("yolo", backbone=..., weights="imagenet")` loads the ImageNet weights into
    `model.backbone`; everything else is the head (`--freeze-backbone` trains only it).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, num_classes: int = 20, S: int | None = None,
                 B: int = 2, img_size: int = 448, in_channels: int = 3, width: float = 1.0,
                 head_channels: int = 256, stride: int = CONV_HEAD_STRIDE):
        super().__init__()
        if isinstance(stride, bool) or stride not in HEAD_STRIDES:
            raise ModelError(f"yolo: stride must be one of {', '.join(map(str, HEAD_STRIDES))}, got {stride!r}",
                             fix="use stride=32 (the backbone's last map) or 16 for small, close objects")
        self._set_grid(num_classes=num_classes, S=S, B=B, img_size=img_size, stride=stride,
                       in_channels=in_channels)
        width = check_width(width)
        check_int(head_channels, "head_channels", 1)
        self.backbone = build_backbone(backbone, out_indices=(HEAD_STRIDES[stride],), in_channels=in_channels,
                                       log=None)
        self.backbone_name = self.backbone.cnnkit_backbone
        self.min_input_size = int(self.backbone.min_input_size)
        channels = self.backbone.channels[-1]
        hidden = scaled(head_channels, width)
        self.head = nn.Sequential(*conv_bn_leaky(channels, hidden, 3), *conv_bn_leaky(hidden, hidden, 3),
                                  nn.AdaptiveAvgPool2d(self.S), nn.Conv2d(hidden, self.outputs_per_cell, 1))
        _init_weights(self.head)
        nn.init.normal_(self.head[-1].weight, 0.0, 0.01)
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's map at the head's stride."""
        self.check_input(x)
        return self.backbone(x)[-1]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).permute(0, 2, 3, 1).contiguous()


@register_model("yolov1", task="detect",
                description="YOLO (Redmon et al. 2016): 24 conv + 2 FC layers, 7x7x30 output at 448")
def yolov1(**kwargs) -> YOLOv1:
    """YOLO v1 (Redmon et al. 2016, Figure 3): 24 conv + 2 FC layers; keyword options as `YOLOv1`."""
    return YOLOv1("yolov1", **kwargs)


@register_model("yolov1_fast", task="detect", description="Fast YOLO (Redmon et al. 2016): 9 conv + 2 FC layers")
def yolov1_fast(**kwargs) -> YOLOv1:
    """Fast YOLO (Redmon et al. 2016): 9 conv layers with fewer filters + the YOLO FC head."""
    return YOLOv1("fast", **kwargs)


@register_model("yolov1_vgg16", task="detect",
                description="YOLO with VGG-16's convolutions as backbone (Redmon et al. 2016, Table 1)")
def yolov1_vgg16(**kwargs) -> YOLOv1:
    """YOLO on VGG-16 (Redmon et al. 2016, Table 1): VGG-16 convs (model.backbone) + YOLO head."""
    return YOLOv1("vgg16", **kwargs)


@register_model("yolo", task="detect", description="YOLO output on any registered backbone, conv head")
def yolo(**kwargs) -> YOLO:
    """YOLO's S x S x (5B+C) output on a registered backbone's stride-32 map; options as `YOLO`."""
    return YOLO(**kwargs)
