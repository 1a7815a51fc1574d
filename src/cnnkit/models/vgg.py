"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015.

Only 3x3 convolutions (stride 1, padding 1: the size is kept) in five stages, each closed by a 2x2
max pool of stride 2; two stacked 3x3 layers see 5x5, three see 7x7, with fewer parameters and more
non-linearities (Section 2.3). Then three fully connected layers (4096, 4096, classes) with dropout
0.5 after the first two (Section 3.1). `CONFIGS` is the paper's Table 1; "_bn" variants add batch
normalisation after every convolution (not in the paper; torchvision's layout).

State_dict keys are torchvision's (`features.N.*`, `classifier.{0,3,6}.*`), so its checkpoints load
unchanged. An adaptive average pool (7x7 by default) before the classifier lets any input of at least
32 pixels (2^5, five pools) run; the paper trained on 224x224 crops.
"""

from __future__ import annotations

import torch.nn as nn

from cnnkit.errors import ModelError
from cnnkit.models.alexnet import FC_WIDTH, ConvClassifier, check_options, scaled
from cnnkit.models.registry import register_model

# Table 1 of the paper, one (channels, number of 3x3 convolutions) pair per stage; every stage ends
# with a 2x2 stride-2 max pool.
CONFIGS: dict[str, tuple[tuple[int, int], ...]] = {
    "A": ((64, 1), (128, 1), (256, 2), (512, 2), (512, 2)),  # VGG-11
    "B": ((64, 2), (128, 2), (256, 2), (512, 2), (512, 2)),  # VGG-13
    "D": ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)),  # VGG-16
    "E": ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)),  # VGG-19
}


def make_layers(stages, *, batch_norm: bool = False, in_channels: int = 3,
                width: float = 1.0) -> nn.Sequential:
    """The convolutional part of a VGG: per stage, [conv 3x3 (+ BN) + ReLU] x n, then max pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for stage_channels, convs in stages:
        out_channels = scaled(stage_channels, width)
        for _ in range(convs):
            layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            channels = out_channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGG(ConvClassifier):
    """VGG (Simonyan & Zisserman 2015), torchvision's layer layout and state_dict keys.

    Args:
        config: a column of Table 1: "A" (VGG-11), "B" (VGG-13), "D" (VGG-16) or "E" (VGG-19).
        batch_norm: add BatchNorm2d after every convolution.
        num_classes: outputs of the last layer (1000 for ImageNet; 0 for no classifier).
        dropout: dropout probability after the two hidden FC layers (0.5, as in the paper).
        in_channels: image channels (3 for RGB, 1 for grayscale).
        width: multiplies every conv width and the FC hidden width 4096 (rounded, at least 1).
        pool_size: output size of the adaptive average pool before the classifier (7, as at
            224x224; 1 makes a small model for CPU experiments).

    Weights start as in torchvision: He (Kaiming) normal with fan_out for convolutions, N(0, 0.01)
    for FC layers, zero biases, batch-norm scale 1 and shift 0.
    """

    def __init__(self, config: str = "D", *, batch_norm: bool = False, num_classes: int = 1000,
                 dropout: float = 0.5, in_channels: int = 3, width: float = 1.0,
                 pool_size: int | tuple[int, int] = 7):
        if config not in CONFIGS:
            raise ModelError(f"unknown VGG configuration {config!r}",
                             fix=f"use one of {', '.join(CONFIGS)} (Table 1 of the paper)")
        pool = check_options(num_classes=num_classes, dropout=dropout, in_channels=in_channels,
                             width=width, pool_size=pool_size)
        stages = CONFIGS[config]
        features = make_layers(stages, batch_norm=batch_norm, in_channels=in_channels, width=width)
        channels = scaled(stages[-1][0], width)
        hidden = scaled(FC_WIDTH, width)
        classifier = nn.Sequential(
            nn.Linear(channels * pool[0] * pool[1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, max(num_classes, 1)),
        )
        super().__init__(features, classifier, in_channels=in_channels, feature_channels=channels,
                         pool_size=pool, num_classes=num_classes)
        self.config = config
        self.batch_norm = batch_norm

    def init_layer(self, module: nn.Module) -> None:
        init_layer(module)


def init_layer(module: nn.Module, leaky_slope: float | None = None) -> None:
    """One layer's initialisation for VGG-style nets: He-normal (fan_out) convolutions for ReLU, or
    for a leaky ReLU of slope `leaky_slope`; N(0, 0.01) fully connected layers; zero biases; BN 1 / 0."""
    if isinstance(module, nn.Conv2d):
        if leaky_slope is None:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.kaiming_normal_(module.weight, a=leaky_slope, mode="fan_out", nonlinearity="leaky_relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)


@register_model("vgg11", description="VGG-11, configuration A (Simonyan & Zisserman 2015)")
def vgg11(**kwargs) -> VGG:
    """VGG-11 (configuration A, 8 conv + 3 FC layers); keyword options as `VGG`."""
    return VGG("A", **kwargs)


@register_model("vgg11_bn", description="VGG-11 with batch normalisation")
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with batch normalisation after every convolution; keyword options as `VGG`."""
    return VGG("A", batch_norm=True, **kwargs)


@register_model("vgg13", description="VGG-13, configuration B (Simonyan & Zisserman 2015)")
def vgg13(**kwargs) -> VGG:
    """VGG-13 (configuration B, 10 conv + 3 FC layers); keyword options as `VGG`."""
    return VGG("B", **kwargs)


@register_model("vgg13_bn", description="VGG-13 with batch normalisation")
def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 with batch normalisation after every convolution; keyword options as `VGG`."""
    return VGG("B", batch_norm=True, **kwargs)


@register_model("vgg16", description="VGG-16, configuration D (Simonyan & Zisserman 2015)")
def vgg16(**kwargs) -> VGG:
    """VGG-16 (configuration D, 13 conv + 3 FC layers); keyword options as `VGG`."""
    return VGG("D", **kwargs)


@register_model("vgg16_bn", description="VGG-16 with batch normalisation")
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with batch normalisation after every convolution; keyword options as `VGG`."""
    return VGG("D", batch_norm=True, **kwargs)


@register_model("vgg19", description="VGG-19, configuration E (Simonyan & Zisserman 2015)")
def vgg19(**kwargs) -> VGG:
    """VGG-19 (configuration E, 16 conv + 3 FC layers); keyword options as `VGG`."""
    return VGG("E", **kwargs)


@register_model("vgg19_bn", description="VGG-19 with batch normalisation")
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with batch normalisation after every convolution; keyword options as `VGG`."""
    return VGG("E", batch_norm=True, **kwargs)
