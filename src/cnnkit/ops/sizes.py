"""Size arithmetic for convolution, pooling and transposed convolution, and receptive fields.

Output size of a convolution or pooling along one axis (the same formula torch documents):

    out = floor((n + 2p - d(k - 1) - 1) / s) + 1          (ceil instead of floor with ceil_mode)

Output size of a transposed convolution:

    out = (n - 1) s - 2p + d(k - 1) + output_padding + 1

Receptive field and total stride ("jump") of a stack of layers, from the input outwards:

    r_l = r_{l-1} + (k_l - 1) d_l j_{l-1},     j_l = j_{l-1} s_l,     r_0 = 1, j_0 = 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from cnnkit.errors import ShapeError


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ShapeError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output length of a convolution or pooling along one axis; ShapeError if it would be < 1."""
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ShapeError(f"invalid geometry: kernel {kernel_size}, stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    span = dilation * (kernel_size - 1) + 1
    padded = size + 2 * padding
    if span > padded:
        raise ShapeError(f"kernel spans {span} pixels but the padded input is only {padded} "
                         f"({size} + 2x{padding})", fix="use a larger input, more padding or a smaller kernel")
    q = (padded - span) / stride
    out = (math.ceil(q) if ceil_mode else math.floor(q)) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # torch: the last window must start inside the input or left padding
    return out


def pool_output_size(size: int, kernel_size: int, stride: int | None = None, padding: int = 0,
                     dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output length of max/mean pooling (stride defaults to the kernel size, as in torch).

    Like torch, padding may be at most half the kernel size, so that no window lies in padding only.
    """
    if kernel_size >= 1 and padding > kernel_size // 2:
        raise ShapeError(f"pooling padding {padding} is more than half the kernel size {kernel_size}",
                         fix=f"use padding <= {kernel_size // 2}")
    return conv_output_size(size, kernel_size, kernel_size if stride is None else stride,
                            padding, dilation, ceil_mode)


def conv_transpose_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    """Output length of a transposed convolution: (n-1)s - 2p + d(k-1) + output_padding + 1."""
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0 or output_padding < 0:
        raise ShapeError(f"invalid geometry: kernel {kernel_size}, stride {stride}, padding {padding}, "
                         f"output_padding {output_padding}, dilation {dilation}")
    if output_padding >= max(stride, dilation):
        raise ShapeError(f"output_padding {output_padding} must be smaller than stride {stride} "
                         f"or dilation {dilation}")
    out = (size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1
    if out < 1:
        raise ShapeError(f"transposed convolution would give size {out}; reduce the padding")
    return out


@dataclass(frozen=True)
class LayerGeometry:
    """The geometry of one layer along one axis, as receptive-field arithmetic needs it."""

    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    padding: int = 0


@dataclass(frozen=True)
class FieldOfView:
    """Receptive field (pixels of the input seen by one output pixel) and total stride ("jump")."""

    receptive_field: int
    total_stride: int
    start: float  # centre of the first output pixel's field, in input pixel coordinates


def receptive_fields(layers: Iterable[LayerGeometry]) -> list[FieldOfView]:
    """Receptive field and total stride after each layer of a stack, input first."""
    r, j, start = 1, 1, 0.5
    out = []
    for g in layers:
        start = start + ((g.kernel_size - 1) * g.dilation / 2 - g.padding) * j
        r = r + (g.kernel_size - 1) * g.dilation * j
        j = j * g.stride
        out.append(FieldOfView(r, j, start))
    return out


def receptive_field(layers: Iterable[LayerGeometry]) -> FieldOfView:
    """Receptive field and total stride of the whole stack (1 pixel, stride 1 for an empty one)."""
    fields = receptive_fields(layers)
    return fields[-1] if fields else FieldOfView(1, 1, 0.5)
