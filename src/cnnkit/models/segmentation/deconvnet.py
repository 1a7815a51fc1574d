"""DeconvNet (Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015):
a VGG-16 encoder, fc6/fc7 as convolutions, then a mirrored decoder of max-unpooling (with the
encoder's own switches) and transposed convolutions. Registered as "deconvnet".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.alexnet import FC_WIDTH, scaled
from cnnkit.models.inputs import check_int
from cnnkit.models.registry import register_model
from cnnkit.models.segmentation.common import (SegmentationNet, conv_bn_relu, init_decoder, max_pool_chain,
                                               spatial_size)
from cnnkit.ops.sizes import conv_output_size


class TransposedConvBNReLU(nn.Module):
    """Transposed convolution (no bias) + BatchNorm + ReLU; `forward(x, size)` gives an (H, W) map:
    the transposed convolution's `output_size`, which picks the output padding (< stride) that
    undoes the rounding down of the convolution it mirrors."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride=1, padding=0, dilation=1):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel, stride, padding,
                                       dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x, output_size=list(size))))


class DeconvNet(SegmentationNet):
    """DeconvNet (Noh, Hong & Han, ICCV 2015, Figure 2 and Table 1).

    Encoder: the backbone's convolutions and max pools (VGG-16, `model.backbone`), each pool also
    returning its switches (argmax positions, `build_backbone(..., return_indices=True)`). Then fc6
    (7x7 convolution) and fc7 (1x1), each + BN + ReLU, and "deconv-fc6", a 7x7 transposed convolution
    back to the last stage's channels. The paper's fc6 has no padding and turns the 7x7 pool5 map of
    a 224x224 input into 1x1, which its 7x7 deconvolution turns back into 7x7; to take inputs of any
    size, fc6 and deconv-fc6 here are padded by 3 and keep the map size. The parameters are the
    same; at 224x224 the centre pixel of this fc6 is the paper's single fc6 output.

    Decoder: the encoder mirrored. For each encoder stage, last first: max-unpooling
    (`F.max_unpool2d` via `nn.MaxUnpool2d`) with that stage's pool switches and input size (each
    value returns to the place its maximum came from, the rest is zero), then one transposed
    convolution + BN + ReLU per encoder convolution, in reverse order, with that convolution's
    kernel, stride and padding and its channels reversed (in VGG: 3x3, stride 1, padding 1). The
    last one of the first stage keeps its channels instead of mapping back to the image channels
    (the paper's deconv1-2 has 64). A 1x1 convolution gives the class scores. BN after every layer
    of the fc part and the decoder follows the paper; the encoder is the backbone as registered
    (`backbone="vgg16_bn"` adds BN there too, as in the paper).

    Args:
        backbone: "vgg16" (default), another VGG, "alexnet" or "tv_vgg16".
        num_classes, in_channels, img_size: see the module doc.
        width: multiplies fc_channels, and the backbone's channels (cnnkit backbones); the decoder
            mirrors the encoder, so it follows.
        fc_channels: channels of fc6 and fc7 (4096, the paper's).
    """

    def __init__(self, backbone: str = "vgg16", *, num_classes: int = 21, in_channels: int = 3,
                 img_size: int = 224, width: float = 1.0, fc_channels: int = FC_WIDTH):
        super().__init__()
        width = self._set_options(num_classes=num_classes, in_channels=in_channels, img_size=img_size,
                                  width=width)
        check_int(fc_channels, "fc_channels", 1)
        self._encoder(backbone, width=width, out_indices=(4,), return_indices=True)
        layers = max_pool_chain(self.backbone, "deconvnet")
        stages: list[list[nn.Conv2d]] = [[]]
        pools: list[nn.MaxPool2d] = []
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                stages[-1].append(layer)
            elif isinstance(layer, nn.MaxPool2d):
                pools.append(layer)
                stages.append([])
        if stages[-1]:
            raise ModelError(f"deconvnet needs a backbone that ends with a max pool, got {self.backbone_name}")
        stages.pop()
        # The encoder's convolution geometry, per stage, to size the mirrored layers in `forward`.
        self._stage_convs = [[(c.kernel_size, c.stride, c.padding, c.dilation) for c in convs]
                             for convs in stages]
        deepest = self.backbone.channels[-1]
        fc = scaled(fc_channels, width)
        self.fc = nn.Sequential(*conv_bn_relu(deepest, fc, 7), *conv_bn_relu(fc, fc, 1))
        self.fc_deconv = TransposedConvBNReLU(fc, deepest, 7, padding=3)
        self.unpool = nn.ModuleList()
        self.deconv = nn.ModuleList()
        for stage, (convs, pool) in reversed(list(enumerate(zip(stages, pools)))):
            self.unpool.append(nn.MaxUnpool2d(pool.kernel_size, pool.stride, pool.padding))
            blocks = nn.ModuleList()
            for conv in reversed(convs):
                out = conv.in_channels if (stage > 0 or conv is not convs[0]) else conv.out_channels
                blocks.append(TransposedConvBNReLU(conv.out_channels, out, conv.kernel_size, conv.stride,
                                                   conv.padding, conv.dilation))
            self.deconv.append(blocks)
        first = stages[0][0].out_channels
        self.classifier = nn.Conv2d(first, self.num_classes, 1)
        for part in (self.fc, self.fc_deconv, self.deconv, self.classifier):
            init_decoder(part)

    def _conv_input_sizes(self, stage: int, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The (H, W) entering each convolution of encoder stage `stage`, whose input is `size`."""
        sizes = []
        for kernel, stride, padding, dilation in self._stage_convs[stage]:
            sizes.append(size)
            size = tuple(conv_output_size(size[a], kernel[a], stride[a], padding[a], dilation[a])
                         for a in range(2))
        return sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes, H, W) at the input's size."""
        self.check_input(x)
        image = spatial_size(x)
        features, pools = self.backbone(x)
        y = self.fc(features[-1])
        y = self.fc_deconv(y, spatial_size(y))
        last = len(pools) - 1
        for j, (unpool, blocks) in enumerate(zip(self.unpool, self.deconv)):
            stage = last - j
            switches = pools[stage]
            y = unpool(y, switches.indices, output_size=list(switches.input_size))
            entry = image if stage == 0 else tuple(int(v) for v in pools[stage - 1].indices.shape[-2:])
            for block, size in zip(blocks, reversed(self._conv_input_sizes(stage, entry))):
                y = block(y, size)
        return self.classifier(y)


@register_model("deconvnet", task="segment",
                description="DeconvNet (Noh et al. 2015): VGG-16 encoder, unpooling + deconvolution decoder")
def deconvnet(**kwargs) -> DeconvNet:
    """DeconvNet (Noh, Hong & Han 2015); keyword options as `DeconvNet`."""
    return DeconvNet(**kwargs)
