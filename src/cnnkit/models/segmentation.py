"""Semantic segmentation networks: a class score for every pixel.

Models (all registered with task "segment"):

==========  ==========================================================================================
name        network
==========  ==========================================================================================
deconvnet   Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015:
            a VGG-16 encoder, fc6/fc7 as convolutions, then a mirrored decoder of max-unpooling
            (with the encoder's own switches) and transposed convolutions. `DeconvNet`.
fcn32s      Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation",
fcn16s      CVPR 2015: VGG-16 with its fully connected layers turned into convolutions, a 1x1 class
fcn8s       score, and learnable transposed convolutions initialised to bilinear interpolation; the
            16s and 8s nets fuse scores of pool4 (and pool3) on the way up ("skip" architecture,
            Section 4.2). `FCN`.
unet        Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
            Segmentation", MICCAI 2015: a contracting path (any registered backbone) and an expanding
            path that upsamples, concatenates the encoder map of the same stride and applies two 3x3
            convolutions, with the upsampling the chapter compares as an option (transposed
            convolution, nearest or bilinear interpolation). `UNet`.
==========  ==========================================================================================

Every model returns logits `[N, num_classes, H, W]` with exactly the input's H and W, for any size of
at least `min_input_size` (odd sizes too): each upsampling step is sized to the map it is fused with
(the skip, or finally the image), never by padding the input. A smaller input raises `ShapeError`.

Shared options: `num_classes` (21: PASCAL VOC's 20 classes and background), `in_channels`, `img_size`
(the default input size, recorded for summaries and training), `width` (multiplies the decoder / head
channels, and for the cnnkit encoders, AlexNet and VGG, their channels too: a thin encoder cannot take
ImageNet weights) and `backbone`. Attributes: `num_classes`, `in_channels`, `img_size`,
`min_input_size`, `backbone` (a `cnnkit.models.backbones.Backbone`), `backbone_name`.

Transfer learning: `build_model("unet", backbone="efficientnet_lite0", weights="imagenet")` loads the
ImageNet weights into `model.backbone` (`cnnkit.models.weights.load_weights`); the decoder keeps its
initialisation: He-normal convolutions, BatchNorm 1 / 0, FCN's upsamplers bilinear and its class
scores zero (Section 4.2 of the FCN paper).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.errors import ModelError, ShapeError
from cnnkit.models.alexnet import FC_WIDTH, scaled
from cnnkit.models.backbones import Backbone, build_backbone, get_backbone
from cnnkit.models.inputs import check_image_batch, check_int, check_width
from cnnkit.models.registry import register_model
from cnnkit.models.vgg import init_layer
from cnnkit.ops.sizes import conv_output_size

UPSAMPLE_KINDS = ("transposed", "nearest", "bilinear")
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)
FCN_STRIDES = (32, 16, 8)


# --- checks --------------------------------------------------------------------------------------



def _check_probability(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ModelError(f"{what} must be a probability in [0, 1], got {value!r}")
    return float(value)


# --- bilinear upsampling as a learnable transposed convolution ------------------------------------

def bilinear_kernel(channels: int, factor: int, *, depthwise: bool = True) -> torch.Tensor:
    """The weight of a transposed convolution that upsamples by `factor` with bilinear interpolation.

    The 2D filter is the outer product of the 1D "tent" w(t) = 1 - |t - c| / factor, t = 0..k-1, of
    size k = 2 factor - factor % 2 centred at c = (k - 1) / 2 (Long et al. 2015, Section 3.3:
    "upsampling with factor f is convolution with a fractional input stride of 1/f ... a
    deconvolution ... initialized to bilinear interpolation"). Shape (channels, 1, k, k) for a
    depthwise convolution (`groups=channels`), or (channels, channels, k, k) with the filter on the
    diagonal (each channel upsampled on its own, no mixing) for a full one.
    """
    check_int(channels, "channels", 1)
    check_int(factor, "factor", 1)
    size = 2 * factor - factor % 2
    centre = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float64)
    tent = (1 - (t - centre).abs() / factor).to(torch.get_default_dtype())
    filt = tent[:, None] * tent[None, :]
    if depthwise:
        return filt.expand(channels, 1, size, size).clone()
    weight = torch.zeros(channels, channels, size, size, dtype=filt.dtype)
    index = torch.arange(channels)
    weight[index, index] = filt
    return weight


def bilinear_upsampling(channels: int, factor: int, *, depthwise: bool = True) -> nn.ConvTranspose2d:
    """A learnable x`factor` upsampler, `nn.ConvTranspose2d` (kernel 2f - f % 2, stride f, padding
    f // 2, no bias) initialised to bilinear interpolation (`bilinear_kernel`).

    An n-pixel map becomes exactly f n pixels; call it with `output_size=` for f n + r, 0 <= r < f
    (the extra r rows / columns at the bottom / right get the kernel's tail, an extrapolation).

    Exactness: output pixel o sits at input coordinate u = (o + 0.5) / f - 0.5 (the half-pixel
    convention of `align_corners=False`; the padding f // 2 is what puts it there). At
    initialisation the output equals `F.interpolate(x, scale_factor=f, mode="bilinear",
    align_corners=False)` (up to rounding) at every output pixel whose row and column both have
    0 <= u <= n - 1, i.e. (f - 1) / 2 <= o <= f n - (f + 1) / 2: everywhere but a border of
    floor(f / 2) rows / columns on each side (for f = 2: the first and last), where
    `F.interpolate` repeats the edge pixel and the transposed convolution sees zeros beyond the
    edge. The same convention puts the centre of a stride-s pooling cell, s i + (s - 1) / 2, where
    the upsampled coarse map has it, so the fused maps of FCN line up.

    `depthwise=True` gives one filter per channel (`groups=channels`: channels * k^2 weights, which
    stays small for many classes); `depthwise=False` a full convolution with the bilinear filter on
    the diagonal, as in the paper's reference implementation, free to learn across channels.
    """
    weight = bilinear_kernel(channels, factor, depthwise=depthwise)
    size = weight.shape[-1]
    layer = nn.ConvTranspose2d(channels, channels, size, stride=factor, padding=factor // 2,
                               groups=channels if depthwise else 1, bias=False)
    init_bilinear_(layer)
    return layer


def init_bilinear_(layer: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
    """Set a `bilinear_upsampling` layer's weight (back) to bilinear interpolation, in place."""
    factor = int(layer.stride[0])
    depthwise = layer.groups == layer.in_channels and layer.groups > 1
    weight = bilinear_kernel(layer.in_channels, factor, depthwise=depthwise or layer.in_channels == 1)
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise ModelError(f"not a bilinear upsampling layer: weight {tuple(layer.weight.shape)}, "
                         f"expected {tuple(weight.shape)}", fix="build it with bilinear_upsampling()")
    with torch.no_grad():
        layer.weight.copy_(weight.to(device=layer.weight.device, dtype=layer.weight.dtype))
    return layer


# --- small pieces ----------------------------------------------------------------------------------

def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> list[nn.Module]:
    """Conv (padding k // 2: size kept, no bias) + BatchNorm + ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _init_decoder(module: nn.Module) -> None:
    """He-normal convolutions (fan_out, VGG's convention), and for transposed convolutions over the
    outputs each input reaches (torch's fan_in of their weight); zero biases; BatchNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            init_layer(m)


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


def _size(x: torch.Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])


# --- the shared base -------------------------------------------------------------------------------

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


def _max_pool_chain(backbone: Backbone, model: str, *, halving: bool = False) -> list[nn.Module]:
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


# --- DeconvNet ---------------------------------------------------------------------------------------

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
        layers = _max_pool_chain(self.backbone, "deconvnet")
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
            _init_decoder(part)

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
        image = _size(x)
        features, pools = self.backbone(x)
        y = self.fc(features[-1])
        y = self.fc_deconv(y, _size(y))
        last = len(pools) - 1
        for j, (unpool, blocks) in enumerate(zip(self.unpool, self.deconv)):
            stage = last - j
            switches = pools[stage]
            y = unpool(y, switches.indices, output_size=list(switches.input_size))
            entry = image if stage == 0 else tuple(int(v) for v in pools[stage - 1].indices.shape[-2:])
            for block, size in zip(blocks, reversed(self._conv_input_sizes(stage, entry))):
                y = block(y, size)
        return self.classifier(y)


# --- FCN -------------------------------------------------------------------------------------------

class FCN(SegmentationNet):
    """FCN-32s / 16s / 8s (Long, Shelhamer & Darrell, CVPR 2015, Sections 3 and 4.2, Figure 3).

    The classifier made fully convolutional (Section 3.1): VGG-16's convolutions and pools
    (`model.backbone`), fc6 as a 7x7 convolution (padding 3) + ReLU + dropout, fc7 as a 1x1
    convolution + ReLU + dropout, and `score_fr`, a 1x1 convolution to the class scores at stride 32.

    - FCN-32s: `upscore` upsamples the stride-32 scores x32 to the image.
    - FCN-16s: `upscore2` upsamples them x2; `score_pool4`, a 1x1 convolution on pool4, is added;
      `upscore` upsamples the sum x16.
    - FCN-8s: the sum is upsampled x2 again (`upscore_pool4`), `score_pool3` (on pool3) is added,
      and `upscore` upsamples x8.

    Every upsampler is `bilinear_upsampling`: a learnable transposed convolution initialised to
    bilinear interpolation (Section 3.3; the paper also learns the intermediate ones and fixes the
    final one, here all are learnable: set `upscore.weight.requires_grad_(False)` to fix it). The
    class scoring layers start at zero (Section 4.2: score_fr "zero-initialized ... random
    initialization yield[s] neither better performance nor faster convergence"; the skip scores
    start at zero so that the net starts as its coarser parent).

    Sizes: where the paper pads the first convolution by 100 and crops, here each upsampling is
    given the size of the map it is added to (`output_size`: pool4, pool3, then the image), so any
    input of at least 32 pixels gives scores at its own size, with no padding and no cropping. The
    taps are the outputs of the encoder's max pools at strides 8, 16 and 32 (pool3, pool4, pool5 in
    VGG), the maps the paper fuses.

    Args:
        stride: 32, 16 or 8 (the net's name).
        backbone: "vgg16" (default), another VGG or "tv_vgg16": an encoder whose pools halve the
            size exactly (AlexNet's unpadded windows do not line up with the upsampled scores).
        num_classes, in_channels, img_size: see the module doc.
        width: multiplies fc_channels, and the backbone's channels (cnnkit backbones).
        fc_channels: channels of fc6 and fc7 (4096).
        dropout: after fc6 and fc7 (0.5).
        depthwise_upsampling: one bilinear filter per class (default); False gives the paper's full
            class-to-class transposed convolutions (num_classes^2 filters each).
    """

    def __init__(self, stride: int = 8, backbone: str = "vgg16", *, num_classes: int = 21,
                 in_channels: int = 3, img_size: int = 224, width: float = 1.0, fc_channels: int = FC_WIDTH,
                 dropout: float = 0.5, depthwise_upsampling: bool = True):
        super().__init__()
        if stride not in FCN_STRIDES:
            raise ModelError(f"FCN stride must be one of {FCN_STRIDES} (fcn32s, fcn16s, fcn8s), got {stride!r}")
        width = self._set_options(num_classes=num_classes, in_channels=in_channels, img_size=img_size,
                                  width=width)
        check_int(fc_channels, "fc_channels", 1)
        dropout = _check_probability(dropout, "dropout")
        self.stride = stride
        self._encoder(backbone, width=width, out_indices=(4,))
        layers = _max_pool_chain(self.backbone, f"fcn{stride}s", halving=True)
        self._taps: dict[int, int] = {}  # position in the chain -> output stride of that max pool
        channels: dict[int, int] = {}  # output stride -> channels
        total, current = 1, self.in_channels
        for pos, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                total *= int(layer.stride[0])
                current = layer.out_channels
            elif isinstance(layer, nn.MaxPool2d):
                total *= int(layer.stride if isinstance(layer.stride, int) else layer.stride[0])
                if total in (8, 16, 32):
                    self._taps[pos] = total
                    channels[total] = current
        needed = [s for s in FCN_STRIDES if s >= stride]
        if any(s not in channels for s in needed):
            raise ModelError(f"backbone {self.backbone_name} has no max pool output at strides "
                             f"{needed}", fix="use a VGG backbone")
        self._last = max(self._taps)
        classes = self.num_classes
        fc = scaled(fc_channels, width)
        self.fc = nn.Sequential(nn.Conv2d(channels[32], fc, 7, padding=3), nn.ReLU(inplace=True),
                                nn.Dropout(dropout), nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True),
                                nn.Dropout(dropout))
        self.score_fr = nn.Conv2d(fc, classes, 1)
        if stride <= 16:
            self.upscore2 = bilinear_upsampling(classes, 2, depthwise=depthwise_upsampling)
            self.score_pool4 = nn.Conv2d(channels[16], classes, 1)
        if stride == 8:
            self.upscore_pool4 = bilinear_upsampling(classes, 2, depthwise=depthwise_upsampling)
            self.score_pool3 = nn.Conv2d(channels[8], classes, 1)
        self.upscore = bilinear_upsampling(classes, stride, depthwise=depthwise_upsampling)
        _init_decoder(self.fc)
        for name in ("score_fr", "score_pool4", "score_pool3"):
            layer = getattr(self, name, None)
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The outputs of the encoder's max pools at strides 8, 16 and 32, keyed by stride."""
        self.check_input(x)
        maps: dict[int, torch.Tensor] = {}
        for pos, layer in enumerate(self.backbone.features):
            x = layer(x)
            if pos in self._taps:
                maps[self._taps[pos]] = x
            if pos == self._last:
                break
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes, H, W) at the input's size."""
        image = list(_size(x))
        maps = self.forward_features(x)
        score = self.score_fr(self.fc(maps[32]))
        if self.stride <= 16:
            skip = self.score_pool4(maps[16])
            score = self.upscore2(score, output_size=list(_size(skip))) + skip
        if self.stride == 8:
            skip = self.score_pool3(maps[8])
            score = self.upscore_pool4(score, output_size=list(_size(skip))) + skip
        return self.upscore(score, output_size=image)


# --- U-Net -----------------------------------------------------------------------------------------

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
        natural = [self.factor * n for n in _size(x)]
        # An encoder that rounds sizes down leaves up to factor - 1 more pixels (output_size adds
        # them); one that rounds up leaves fewer (crop the bottom / right). Encoders whose windows
        # are not padded to the stride (AlexNet) can leave more: the output is then resized.
        wanted = [min(max(s, n), n + self.factor - 1) for s, n in zip(size, natural)]
        y = self.up(x, output_size=wanted)[..., : size[0], : size[1]]
        if _size(y) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return y

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                size: Sequence[int] | None = None) -> torch.Tensor:
        target = _size(skip) if skip is not None else tuple(int(s) for s in size)
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
        _init_decoder(self.decoder)
        _init_decoder(self.head)
        if not isinstance(aux_loss, bool):
            raise ModelError(f"aux_loss must be True or False, got {aux_loss!r}")
        self.aux_classifier = None
        if aux_loss:
            if len(channels) < 2:
                raise ModelError("aux_loss needs a decoder block that fuses two levels", fix="drop aux_loss")
            self.aux_classifier = nn.Conv2d(widths[0], self.num_classes, 1)
            _init_decoder(self.aux_classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes, H, W) at the input's size."""
        self.check_input(x)
        image = _size(x)
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


# --- registry ------------------------------------------------------------------------------------

@register_model("deconvnet", task="segment",
                description="DeconvNet (Noh et al. 2015): VGG-16 encoder, unpooling + deconvolution decoder")
def deconvnet(**kwargs) -> DeconvNet:
    """DeconvNet (Noh, Hong & Han 2015); keyword options as `DeconvNet`."""
    return DeconvNet(**kwargs)


@register_model("fcn32s", task="segment",
                description="FCN-32s (Long et al. 2015): VGG-16, x32 bilinear-init upsampling")
def fcn32s(**kwargs) -> FCN:
    """FCN-32s (Long, Shelhamer & Darrell 2015); keyword options as `FCN`."""
    return FCN(32, **kwargs)


@register_model("fcn16s", task="segment", description="FCN-16s (Long et al. 2015): FCN-32s + pool4 skip")
def fcn16s(**kwargs) -> FCN:
    """FCN-16s (Long, Shelhamer & Darrell 2015); keyword options as `FCN`."""
    return FCN(16, **kwargs)


@register_model("fcn8s", task="segment", description="FCN-8s (Long et al. 2015): FCN-16s + pool3 skip")
def fcn8s(**kwargs) -> FCN:
    """FCN-8s (Long, Shelhamer & Darrell 2015); keyword options as `FCN`."""
    return FCN(8, **kwargs)


@register_model("unet", task="segment",
                description="U-Net (Ronneberger et al. 2015) on any backbone (EfficientNet-Lite0 default)")
def unet(**kwargs) -> UNet:
    """U-Net (Ronneberger, Fischer & Brox 2015) on a registered backbone; keyword options as `UNet`."""
    return UNet(**kwargs)
