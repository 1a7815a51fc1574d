"""AlexNet: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NeurIPS 2012.

Five convolutional layers (the first 11x11 with stride 4), overlapping 3x3 stride-2 max pooling
(Section 3.4), then three fully connected layers with dropout 0.5 before the first two (Section 4.2).
Almost all of its 61 million parameters sit in the fully connected layers.

The channel widths are those of the single-GPU variant (64-192-384-256-256, no local response
normalisation; Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks")
that torchvision ships, so that its checkpoints load unchanged: the state_dict keys are
`features.{0,3,6,8,10}.*` and `classifier.{1,4,6}.*`. The 2012 paper's two-GPU model had
96-256-384-384-256 channels split between the GPUs.

An adaptive average pool (6x6 by default) sits between the features and the classifier, so any input
of at least `min_input_size` (63) pixels works; the paper used 224x224 crops (227 in practice).

This module also holds `ConvClassifier`, the features -> pool -> classifier layout that AlexNet
introduced and VGG kept, with the timm-style interface both share.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cnnkit.errors import ModelError, ShapeError
from cnnkit.models.registry import register_model
from cnnkit.models.summary import smallest_input_size

# The convolutional layers, as in the paper's Figure 2 (single-GPU widths):
#   (out_channels, kernel, stride, padding, max-pool after it)
ALEXNET_CONVS = (
    (64, 11, 4, 2, True),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
ALEXNET_POOL = (3, 2)  # overlapping pooling: 3x3 windows, stride 2
FC_WIDTH = 4096  # hidden units of each of the two hidden fully connected layers (AlexNet and VGG)


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, rounded half up, at least 1."""
    return max(1, math.floor(channels * width + 0.5))


def check_options(*, num_classes, dropout, in_channels, width, pool_size) -> tuple[int, int]:
    """Validate the options AlexNet and VGG share; returns `pool_size` as (height, width)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ModelError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"in_channels must be an int >= 1, got {in_channels!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ModelError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if not isinstance(width, (int, float)) or not (math.isfinite(width) and width > 0):
        raise ModelError(f"width must be a positive number, got {width!r}")
    pool = tuple(pool_size) if isinstance(pool_size, (tuple, list)) else (pool_size, pool_size)
    if len(pool) != 2 or not all(type(v) is int and v >= 1 for v in pool):
        raise ModelError(f"pool_size must be an int >= 1 or a pair of them, got {pool_size!r}")
    return pool  # type: ignore[return-value]


class ConvClassifier(nn.Module):
    """`features` (convolutions) -> `avgpool` (adaptive average pool) -> `classifier` (FC layers).

    The interface follows timm: `forward_features` returns the feature maps before pooling,
    `forward_head` pools and classifies them (`pre_logits=True` stops before the last layer),
    `reset_classifier` swaps the last layer, `num_features` is the channel count of the feature
    maps and `head_hidden_size` the width of the last hidden FC layer. `min_input_size` is the
    smallest H = W the features accept; `forward` raises `ShapeError` below it, or when the channel
    count differs from `in_channels` (shape ints only: the check costs nothing).

    Subclasses build `features` and a `classifier` whose last entry is the final Linear layer, and
    may override `init_layer`.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, *, in_channels: int,
                 feature_channels: int, pool_size: tuple[int, int], num_classes: int):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = classifier
        self.in_channels = in_channels
        self.num_features = feature_channels
        self.head_hidden_size = classifier[-1].in_features
        self.num_classes = num_classes
        self.min_input_size = smallest_input_size(features)
        if num_classes == 0:
            self.classifier[-1] = nn.Identity()
        for module in self.modules():
            self.init_layer(module)

    def init_layer(self, module: nn.Module) -> None:
        """Initialise one layer; the default keeps PyTorch's own initialisation."""

    def check_input(self, x: torch.Tensor) -> None:
        """Raise `ShapeError` unless `x` is (N, in_channels, H, W) with H, W >= min_input_size."""
        name = getattr(self, "cnnkit_name", type(self).__name__)
        if x.dim() != 4:
            fix = ("add the batch dimension: x.unsqueeze(0)" if x.dim() == 3
                   else "pass a batch of images shaped (N, C, H, W)")
            raise ShapeError(f"{name} expects a batch of images (N, C, H, W), got a tensor of shape "
                             f"{tuple(x.shape)}", fix=fix)
        channels, height, width = x.shape[1], x.shape[2], x.shape[3]
        if channels != self.in_channels:
            raise ShapeError(f"{name} was built for {self.in_channels} input channels, got {channels}",
                             fix=f"build it with in_channels={channels}, or convert the images")
        smallest = self.min_input_size
        if height < smallest or width < smallest:
            raise ShapeError(f"{name} needs inputs of at least {smallest}x{smallest} pixels, got "
                             f"{height}x{width}",
                             fix=f"resize the images to {smallest}x{smallest} or larger")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature maps before pooling: (N, num_features, h, w)."""
        self.check_input(x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, flatten and classify feature maps; `pre_logits` stops before the last layer."""
        x = torch.flatten(self.avgpool(x), 1)
        *hidden, last = self.classifier
        for layer in hidden:
            x = layer(x)
        return x if pre_logits else last(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer by a freshly initialised one with `num_classes` outputs (0: none)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ModelError(f"num_classes must be an int >= 0, got {num_classes!r}")
        device = next(self.classifier.parameters()).device
        dtype = next(self.classifier.parameters()).dtype
        head = nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) \
            if num_classes else nn.Identity()
        self.init_layer(head)
        self.classifier[-1] = head
        self.num_classes = num_classes


class AlexNet(ConvClassifier):
    """AlexNet (Krizhevsky et al. 2012), torchvision's layer layout and state_dict keys.

    Args:
        num_classes: outputs of the last layer (1000 for ImageNet; 0 for no classifier).
        dropout: dropout probability before the two hidden FC layers (0.5, as in the paper).
        in_channels: image channels (3 for RGB, 1 for grayscale).
        width: multiplies every conv width and the FC hidden width 4096 (rounded, at least 1).
        pool_size: output size of the adaptive average pool before the classifier (6 as in
            torchvision; 1 makes a small model for CPU experiments).
    """

    def __init__(self, num_classes: int = 1000, *, dropout: float = 0.5, in_channels: int = 3,
                 width: float = 1.0, pool_size: int | tuple[int, int] = 6):
        pool = check_options(num_classes=num_classes, dropout=dropout, in_channels=in_channels,
                             width=width, pool_size=pool_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride, padding, pool_after in ALEXNET_CONVS:
            out_channels = scaled(out_channels, width)
            layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU(inplace=True)]
            if pool_after:
                layers.append(nn.MaxPool2d(*ALEXNET_POOL))
            channels = out_channels
        hidden = scaled(FC_WIDTH, width)
        classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(channels * pool[0] * pool[1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, max(num_classes, 1)),
        )
        super().__init__(nn.Sequential(*layers), classifier, in_channels=in_channels,
                         feature_channels=channels, pool_size=pool, num_classes=num_classes)


@register_model("alexnet", description="AlexNet (Krizhevsky et al. 2012), 61.1 M parameters")
def alexnet(**kwargs) -> AlexNet:
    """AlexNet (Krizhevsky et al. 2012); keyword options as `AlexNet`."""
    return AlexNet(**kwargs)
