"""What the segmentation networks share: `SegmentationNet` (options, attributes, the encoder and the
input check), the decoder's initialisation and building blocks, and the check that a backbone is a
plain chain of convolutions and max pools (the encoders whose pools DeconvNet and FCN tap).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.errors import ModelError, ShapeError
from cnnkit.models.backbones import Backbone, build_backbone, get_backbone
from cnnkit.models.inputs import check_image_batch, check_int, check_width
from cnnkit.models.vgg import init_layer


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> list[nn.Module]:
    """Conv (padding k // 2: size kept, no bias) + BatchNorm + ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def init_decoder(module: nn.Module) -> None:
    """He-normal convolutions (fan_out, VGG's convention), and for transposed convolutions over the
    outputs each input reaches (torch's fan_in of their weight); zero biases; BatchNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            init_layer(m)


def spatial_size(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of a map [..., H, W]."""
    return int(x.shape[-2]), int(x.shape[-1])


class SegmentationNet(nn.Module):
    """What the segmentation models share: options, attributes and the input check."""

    num_classes: int
    in_channels: int
    img_size: int
    min_input_size: int
    width: float
    backbone: Backbone
    backbone_name: str

    def _set_options(self, *, num_classes, in_channels, img_size, width) -> float:
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.img_size = check_int(img_size, "img_size", 1)
        self.width = check_width(width)
        return self.width

    def _encoder(self, name: str, *, width: float, **options) -> Backbone:
        """`build_backbone(name, ...)`; `width` goes to the cnnkit backbones (AlexNet, VGG) only."""
        spec = get_backbone(name)
        self.backbone = build_backbone(spec.name, in_channels=self.in_channels, log=None,
                                       width=width if spec.source == "cnnkit" else 1.0, **options)
        self.backbone_name = spec.name
        self.min_input_size = int(self.backbone.min_input_size)
        if self.img_size < self.min_input_size:
            raise ShapeError(f"img_size {self.img_size} is smaller than the {self.min_input_size} pixels "
                             f"this network needs", fix=f"use img_size >= {self.min_input_size}")
        return self.backbone

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ShapeError unless x is (N, in_channels, H, W) with H, W >= min_input_size."""
        check_image_batch(x, name=getattr(self, "cnnkit_name", type(self).__name__), in_channels=self.in_channels,
                          min_size=self.min_input_size,
                          size_fix=f"resize or pad the images to {self.min_input_size} pixels or more "
                                   f"(it was built for {self.img_size})")

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone_name!r}, num_classes={self.num_classes}, "
                f"img_size={self.img_size}, width={self.width:g}")


def max_pool_chain(backbone: Backbone, model: str, *, halving: bool = False) -> list[nn.Module]:
    """The layers of a VGG / AlexNet backbone in call order (its `features`), checked to be plain
    convolutions, BatchNorm, ReLU and max pools: the encoders whose pools DeconvNet and FCN tap.
    `halving=True` also asks for VGG's geometry: size-keeping convolutions (stride 1, padding
    (k - 1) / 2) and 2x2 stride-2 pools, so that the map after pool k has exactly floor(H / 2^k) rows."""
    features = getattr(backbone, "features", None)
    layers = list(features) if isinstance(features, nn.Sequential) else []
    plain = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)
    ok = any(isinstance(m, nn.MaxPool2d) for m in layers) and all(isinstance(m, plain) for m in layers)
    if ok and halving:
        ok = all(m.stride == (1, 1) and m.dilation == (1, 1) and 2 * m.padding[0] == m.kernel_size[0] - 1
                 and 2 * m.padding[1] == m.kernel_size[1] - 1 for m in layers if isinstance(m, nn.Conv2d))
        ok = ok and all(m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2)) and m.padding in (0, (0, 0))
                        and not m.ceil_mode for m in layers if isinstance(m, nn.MaxPool2d))
    if not ok:
        kinds = "a VGG backbone" if halving else "a VGG or AlexNet backbone"
        raise ModelError(f"{model} needs {kinds} (convolutions and max pools), got {backbone.cnnkit_backbone}",
                         fix="use backbone='vgg16' (or another vgg*" + ("" if halving else ", alexnet") +
                             ", tv_vgg16); unet takes any backbone")
    return layers
