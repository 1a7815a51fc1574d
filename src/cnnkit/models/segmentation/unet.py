"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015): a contracting path (any registered backbone) and an expanding path that
upsamples, concatenates the encoder map of the same stride and applies two 3x3 convolutions, with
the upsampling the chapter compares as an option (transposed convolution, nearest or bilinear
interpolation). Registered as "unet".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.errors import ModelError
from cnnkit.models.alexnet import scaled
from cnnkit.models.inputs import check_int
from cnnkit.models.registry import register_model
from cnnkit.models.segmentation.common import SegmentationNet, conv_bn_relu, init_decoder, spatial_size

UPSAMPLE_KINDS = ("transposed", "nearest", "bilinear")
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class Interpolate(nn.Module):
    """`F.interpolate` to a given size as a layer ("nearest", or "bilinear" with
    align_corners=False); `forward(x, size)`."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=tuple(size), mode=self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class UpBlock(nn.Module):
    """One step of U-Net's expanding path: upsample to the skip's size, concatenate the skip (if
    any), then [3x3 conv + BN + ReLU] x 2.

    `upsample`: "transposed" (a learned `nn.ConvTranspose2d` of kernel and stride `factor`, the
    paper's "up-convolution", keeping the channel count so that the three kinds differ only in how
    they upsample; the paper's also halves the channels), "nearest" or "bilinear" (`Interpolate`,
    no parameters).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, upsample: str, factor: int):
        super().__init__()
        self.upsample = upsample
        self.factor = factor
        if upsample == "transposed":
            self.up = nn.ConvTranspose2d(in_channels, in_channels, factor, stride=factor)
        else:
            self.up = Interpolate(upsample)
        self.conv = nn.Sequential(*conv_bn_relu(in_channels + skip_channels, out_channels),
                                  *conv_bn_relu(out_channels, out_channels))

    def _upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.upsample != "transposed":
            return self.up(x, size)
        natural = [self.factor * n for n in spatial_size(x)]
        # An encoder that rounds sizes down leaves up to factor - 1 more pixels (output_size adds
        # them); one that rounds up leaves fewer (crop the bottom / right). Encoders whose windows
        # are not padded to the stride (AlexNet) can leave more: the output is then resized.
        wanted = [min(max(s, n), n + self.factor - 1) for s, n in zip(size, natural)]
        y = self.up(x, output_size=wanted)[..., : size[0], : size[1]]
        if spatial_size(y) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return y

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        target = spatial_size(skip) if skip is not None else tuple(int(s) for s in size)
        x = self._upsample(x, target)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(SegmentationNet):
    """U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, Figure 1) on a registered backbone.

    Contracting path: the backbone (`model.backbone`), tapped at strides 2, 4, 8, 16, 32 (4 to 32
    where it has no stride-2 level, as AlexNet). Expanding path, deepest first: `UpBlock`s that
    upsample to the next shallower map's size, concatenate it ("copy", with no crop needed as the
    sizes match) and apply two 3x3 convolutions + BN + ReLU (BN is not in the paper; it lets the
    decoder train from scratch at usual learning rates); a last block upsamples to the image's size
    without a skip, and a 1x1 convolution gives the class scores (the paper's last layer).

    Args:
        backbone: any name of `cnnkit.models.backbones.list_backbones()` ("efficientnet_lite0",
            whose ImageNet weights are available offline).
        num_classes, in_channels, img_size: see the module doc.
        width: multiplies decoder_channels (and the channels of a cnnkit backbone).
        upsample: "bilinear" (default), "nearest" or "transposed" (see `UpBlock`).
        decoder_channels: output channels of the blocks, deepest first, one per upsampling step
            (5 for a backbone with a stride-2 level, else the first 4 are used).
        output_stride: 1 (default, the paper's): the decoder climbs back to the image's resolution.
            2 or 4: it stops at the backbone's map of that stride, the class scores are computed
            there and bilinearly upsampled to the image (DeepLabv3+'s decoder, Chen et al. 2018,
            predicts at stride 4): the full-resolution blocks, the costliest per pixel, are left out.
        aux_loss: add an auxiliary classifier (a 1x1 convolution) on the first decoder block's output (stride 16
            for the usual backbones): in training mode `forward` returns (scores at the image's size, auxiliary
            scores at that block's size), and the task adds the auxiliary cross-entropy at weight 0.4, on the
            scores upsampled to a quarter of the image's size (PSPNet's auxiliary loss,
            Zhao et al. 2017; deep supervision, Lee et al. 2015): the deep features get a short path to the
            labels. In eval mode it is skipped and `forward` returns the scores alone.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, num_classes: int = 21, in_channels: int = 3,
                 img_size: int = 224, width: float = 1.0, upsample: str = "bilinear",
                 decoder_channels: Sequence[int] = UNET_DECODER_CHANNELS, output_stride: int = 1,
                 aux_loss: bool = False):
        super().__init__()
        if output_stride not in (1, 2, 4) or isinstance(output_stride, bool):
            raise ModelError(f"output_stride must be 1, 2 or 4, got {output_stride!r}")
        if upsample not in UPSAMPLE_KINDS:
            raise ModelError(f"unknown upsample kind {upsample!r}", fix=f"use one of {', '.join(UPSAMPLE_KINDS)}")
        width = self._set_options(num_classes=num_classes, in_channels=in_channels, img_size=img_size,
                                  width=width)
        if not isinstance(decoder_channels, (list, tuple)) or not decoder_channels:
            raise ModelError(f"decoder_channels must be a list of ints, got {decoder_channels!r}")
        for c in decoder_channels:
            check_int(c, "each of decoder_channels", 1)
        self.upsample = upsample
        try:
            self._encoder(backbone, width=width, out_indices=(0, 1, 2, 3, 4))
        except ModelError as exc:
            if "no feature level" not in str(exc):
                raise
            self._encoder(backbone, width=width, out_indices=(1, 2, 3, 4))
        channels, strides = self.backbone.channels, self.backbone.strides
        if output_stride > 1:
            if output_stride not in strides:
                raise ModelError(f"backbone {self.backbone_name} has no stride-{output_stride} map for "
                                 f"output_stride={output_stride}", fix=f"use output_stride 1 or one of {strides[:1]}")
            first = strides.index(output_stride)
            channels, strides = channels[first:], strides[first:]
        self.output_stride = output_stride
        self.first_level = len(self.backbone.channels) - len(channels)
        steps = len(channels) if output_stride == 1 else len(channels) - 1
        if len(decoder_channels) < steps:
            raise ModelError(f"decoder_channels needs {steps} entries for backbone {self.backbone_name} "
                             f"(one per upsampling step), got {len(decoder_channels)}")
        widths = [scaled(c, width) for c in decoder_channels[:steps]]
        self.decoder_channels = tuple(widths)
        blocks = []
        current = channels[-1]
        for i in range(len(channels) - 1):  # fuse the maps at strides[-2], strides[-3], ...
            skip = len(channels) - 2 - i
            blocks.append(UpBlock(current, channels[skip], widths[i], upsample=upsample,
                                  factor=strides[skip + 1] // strides[skip]))
            current = widths[i]
        if output_stride == 1:
            blocks.append(UpBlock(current, 0, widths[-1], upsample=upsample, factor=strides[0]))
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(widths[-1], self.num_classes, 1)
        init_decoder(self.decoder)
        init_decoder(self.head)
        if not isinstance(aux_loss, bool):
            raise ModelError(f"aux_loss must be True or False, got {aux_loss!r}")
        self.aux_classifier = None
        if aux_loss:
            if len(channels) < 2:
                raise ModelError("aux_loss needs a decoder block that fuses two levels", fix="drop aux_loss")
            self.aux_classifier = nn.Conv2d(widths[0], self.num_classes, 1)
            init_decoder(self.aux_classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes, H, W) at the input's size."""
        self.check_input(x)
        image = spatial_size(x)
        maps = self.backbone(x)[self.first_level:]
        y = maps[-1]
        aux = None
        for i in range(len(maps) - 1):
            y = self.decoder[i](y, maps[len(maps) - 2 - i])
            if i == 0 and self.aux_classifier is not None and self.training:
                aux = self.aux_classifier(y)
        if self.output_stride == 1:
            out = self.head(self.decoder[-1](y, size=image))
        else:
            out = F.interpolate(self.head(y), size=image, mode="bilinear", align_corners=False)
        return out if aux is None else (out, aux)


@register_model("unet", task="segment",
                description="U-Net (Ronneberger et al. 2015) on any backbone (EfficientNet-Lite0 default)")
def unet(**kwargs) -> UNet:
    """U-Net (Ronneberger, Fischer & Brox 2015) on a registered backbone; keyword options as `UNet`."""
    return UNet(**kwargs)
