"""Checks shared by the networks: the input batch every forward checks first, constructor options, and
the lookup key of a model or backbone name."""

from __future__ import annotations

import math

import torch

from cnnkit.errors import ModelError, ShapeError


def check_image_batch(x: torch.Tensor, *, name: str, in_channels: int, min_size: int, size_fix: str) -> None:
    """Raise ShapeError unless x is (N, in_channels, H, W) with H, W >= min_size; `size_fix` says how
    to fix a too-small input."""
    if x.dim() != 4:
        raise ShapeError(f"{name} expects a batch of images (N, C, H, W), got a tensor of shape "
                         f"{tuple(x.shape)}", fix="add the batch dimension: x.unsqueeze(0)"
                         if x.dim() == 3 else "pass a batch of images shaped (N, C, H, W)")
    if x.shape[1] != in_channels:
        raise ShapeError(f"{name} was built for {in_channels} input channels, got {x.shape[1]}",
                         fix=f"build it with in_channels={x.shape[1]}, or convert the images")
    if min(x.shape[2], x.shape[3]) < min_size:
        raise ShapeError(f"{name} needs inputs of at least {min_size}x{min_size} pixels, got "
                         f"{x.shape[2]}x{x.shape[3]}", fix=size_fix)


def check_int(value, what: str, low: int) -> int:
    """A constructor option that must be a whole number >= low (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModelError(f"{what} must be an int >= {low}, got {value!r}")
    return value


def check_width(width) -> float:
    """A channel width multiplier: a finite number > 0."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (math.isfinite(width) and width > 0):
        raise ModelError(f"width must be a positive number, got {width!r}")
    return float(width)


def name_key(name: str) -> str:
    """Lookup key of a model or backbone name: case, '-' and '_' do not matter ("VGG-11", "vgg_11" and
    "vgg11" are one model)."""
    return name.strip().lower().replace("-", "").replace("_", "")
