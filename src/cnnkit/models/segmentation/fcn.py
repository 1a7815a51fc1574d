"""FCN-32s / 16s / 8s (Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015): VGG-16 with its fully connected layers turned into convolutions, a 1x1
class score, and learnable transposed convolutions initialised to bilinear interpolation
(`bilinear_upsampling`); the 16s and 8s nets fuse scores of pool4 (and pool3) on the way up.
Registered as "fcn32s", "fcn16s" and "fcn8s".
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.alexnet import FC_WIDTH, scaled
from cnnkit.models.inputs import check_int
from cnnkit.models.registry import register_model
from cnnkit.models.segmentation.common import SegmentationNet, init_decoder, max_pool_chain, spatial_size

FCN_STRIDES = (32, 16, 8)


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
        layers = max_pool_chain(self.backbone, f"fcn{stride}s", halving=True)
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
        init_decoder(self.fc)
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
        image = list(spatial_size(x))
        maps = self.forward_features(x)
        score = self.score_fr(self.fc(maps[32]))
        if self.stride <= 16:
            skip = self.score_pool4(maps[16])
            score = self.upscore2(score, output_size=list(spatial_size(skip))) + skip
        if self.stride == 8:
            skip = self.score_pool3(maps[8])
            score = self.upscore_pool4(score, output_size=list(spatial_size(skip))) + skip
        return self.upscore(score, output_size=image)


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
