"""Upsampling, written out: nearest neighbour, max-unpooling and bilinear interpolation.

    nearest (factor f):  out[i, j] = x[i // f, j // f]                   (each pixel becomes f x f)
    max-unpooling:       out[indices[i, j]] = x[i, j], zero everywhere else
    bilinear:            out[i, j] = (1-a)(1-b) x[y0, x0] + (1-a) b x[y0, x1]
                                   + a (1-b) x[y1, x0] + a b x[y1, x1]
                         where (y, x) is the source point of output pixel (i, j), y0 = floor(y),
                         y1 = y0 + 1 (clamped to the image), a = y - y0, and likewise x0, x1, b.
"""

from __future__ import annotations

import math

import torch

from cnnkit.errors import ShapeError
from cnnkit.ops.conv import check_ndim
from cnnkit.ops.sizes import _pair


def upsample_nearest(x: torch.Tensor, scale_factor=2) -> torch.Tensor:
    """out[..., i, j] = x[..., i // fh, j // fw]: duplicate each pixel into an fh x fw block.

    scale_factor: a positive int or an (H, W) pair of ints. Works on any (..., H, W).
    """
    if x.ndim < 2:
        raise ShapeError(f"upsample_nearest needs at least (H, W), got shape {tuple(x.shape)}")
    factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    if len(factors) != 2 or not all(isinstance(f, int) and f >= 1 for f in factors):
        raise ShapeError(f"scale_factor must be a positive int or a pair of them, got {scale_factor!r}",
                         fix="use upsample_bilinear for fractional factors")
    return x.repeat_interleave(factors[0], dim=-2).repeat_interleave(factors[1], dim=-1)


def max_unpool2d(x: torch.Tensor, indices: torch.Tensor, kernel_size, stride=None, padding=0,
                 output_size=None) -> torch.Tensor:
    """out.flatten(-2)[b, c, indices[b, c, i, j]] = x[b, c, i, j]; every other output pixel is 0.

    The inverse placement of `max_pool2d`: each pooled value goes back to where its maximum was.
    indices are flat h*W + w positions in the output plane (as max_pool2d returns them). The output
    size defaults to (n - 1)*s - 2p + k per axis; `output_size` ((H, W) or (N, C, H, W)) may choose
    any size strictly within `stride` of that default, as F.max_unpool2d allows.
    """
    check_ndim(x, 4, "input", "(N, C, H, W)")
    if indices.shape != x.shape:
        raise ShapeError(f"indices shape {tuple(indices.shape)} must equal input shape {tuple(x.shape)}")
    k, p = _pair(kernel_size), _pair(padding)
    s = k if stride is None else _pair(stride)
    default = [(x.shape[2 + a] - 1) * s[a] - 2 * p[a] + k[a] for a in (0, 1)]
    if output_size is None:
        size = default
    else:
        size = [int(v) for v in output_size][-2:]
        for a in (0, 1):
            if not default[a] - s[a] < size[a] < default[a] + s[a]:
                raise ShapeError(f"output_size {tuple(size)} must be within stride {s} of the "
                                 f"default {tuple(default)}")
    if min(size) < 1:
        raise ShapeError(f"max_unpool2d would give size {tuple(size)}; reduce the padding")
    plane = size[0] * size[1]
    flat = indices.flatten(2).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= plane):
        raise ShapeError(f"indices must lie in [0, {plane}) for an output of size {tuple(size)}, "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    out = x.new_zeros(x.shape[0], x.shape[1], plane).scatter(2, flat, x.flatten(2))
    return out.view(x.shape[0], x.shape[1], *size)


def _source_points(n_in: int, n_out: int, scale_factor, align_corners: bool):
    """For each output index: the two source neighbours (i0, i1) and the weight `a` of i1.

    align_corners=True : src = dst * (n_in - 1) / (n_out - 1)   (corner pixel centres coincide)
    align_corners=False: src = (dst + 0.5) / f - 0.5, clamped at 0 (pixel areas coincide), where
                         f is the given scale_factor, or n_out / n_in when a size was given.
    An axis whose size does not change is copied unchanged, even when f != 1 (floor(3 * 1.2) = 3),
    as torch's CPU kernels do.
    """
    dst = torch.arange(n_out, dtype=torch.float64)
    if n_out == n_in:
        src = dst
    elif align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(dst)
    else:
        scale = 1.0 / scale_factor if scale_factor else n_in / n_out
        src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, src - i0


def upsample_bilinear(x: torch.Tensor, size=None, scale_factor=None,
                      align_corners: bool = False) -> torch.Tensor:
    """Bilinear interpolation: each output pixel is the weighted sum of its 4 source neighbours
    (see the module docstring), as F.interpolate(mode="bilinear") computes it.

    Give either `size` (an int or (H_out, W_out)) or `scale_factor` (a number or a pair); with a
    scale factor the output size is floor(n * f) and, with align_corners=False, f itself (not
    n_out / n_in) maps output to source coordinates, as in torch.
    x: (N, C, H, W).
    """
    check_ndim(x, 4, "input", "(N, C, H, W)")
    if (size is None) == (scale_factor is None):
        raise ShapeError("give exactly one of size and scale_factor")
    n_in = x.shape[-2:]
    if size is not None:
        n_out, factors = _pair(size), (None, None)
    else:
        factors = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
        if len(factors) != 2 or min(factors) <= 0:
            raise ShapeError(f"scale_factor must be positive, got {scale_factor!r}")
        n_out = tuple(math.floor(n * f) for n, f in zip(n_in, factors))
    if min(n_out) < 1:
        raise ShapeError(f"output size {tuple(n_out)} is empty for input size {tuple(n_in)}")
    y0, y1, a = _source_points(n_in[0], n_out[0], factors[0], align_corners)
    x0, x1, b = _source_points(n_in[1], n_out[1], factors[1], align_corners)
    y0, y1, a = (t.to(x.device)[:, None] for t in (y0, y1, a.to(x.dtype)))
    x0, x1, b = (t.to(x.device)[None, :] for t in (x0, x1, b.to(x.dtype)))
    return ((1 - a) * (1 - b) * x[..., y0, x0] + (1 - a) * b * x[..., y0, x1]
            + a * (1 - b) * x[..., y1, x0] + a * b * x[..., y1, x1])
