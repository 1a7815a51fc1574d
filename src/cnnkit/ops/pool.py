"""Subsampling and pooling, written out.

With a K x K window, stride s, padding p and dilation d, window (i, j) covers the input pixels

    (s*i - p + d*m,  s*j - p + d*n),     m = 0 .. kH-1,  n = 0 .. kW-1

    max pooling:   out[i, j] = max  over the window (padding counts as -inf)
    mean pooling:  out[i, j] = sum  over the window (padding counts as 0) / number of pixels counted

Subsampling (stride-2 sampling) keeps every other pixel: out[i, j] = x[2i, 2j]; it is max or mean
pooling with a 1x1 window and stride 2. The windows are gathered with the same shifted views that
`cnnkit.ops.conv` uses: one view per kernel offset (m, n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit.errors import ShapeError
from cnnkit.ops.conv import check_ndim, shifted_view
from cnnkit.ops.sizes import _pair, pool_output_size


def subsample(x: torch.Tensor, stride=2, offset=0) -> torch.Tensor:
    """out[..., i, j] = x[..., offset + s*i, offset + s*j]: keep every s-th pixel (s = 2: every other).

    stride and offset: an int or an (H, W) pair, 0 <= offset < stride. Works on any (..., H, W).
    """
    if x.ndim < 2:
        raise ShapeError(f"subsample needs at least (H, W), got shape {tuple(x.shape)}")
    (sh, sw), (oh, ow) = _pair(stride), _pair(offset)
    if sh < 1 or sw < 1 or not (0 <= oh < sh and 0 <= ow < sw):
        raise ShapeError(f"need stride >= 1 and 0 <= offset < stride, got stride {(sh, sw)}, "
                         f"offset {(oh, ow)}")
    return x[..., oh::sh, ow::sw]


def _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Output size and the extra right/bottom padding a ceil_mode window that hangs off needs."""
    check_ndim(x, 4, "input", "(N, C, H, W)")
    k, p, d = _pair(kernel_size), _pair(padding), _pair(dilation)
    s = k if stride is None else _pair(stride)
    out = tuple(pool_output_size(x.shape[2 + a], k[a], s[a], p[a], d[a], ceil_mode) for a in (0, 1))
    extra = tuple(max(0, (out[a] - 1) * s[a] + d[a] * (k[a] - 1) + 1 - (x.shape[2 + a] + 2 * p[a]))
                  for a in (0, 1))
    return k, s, p, d, out, extra


def _check_windows_see_input(size, k, s, p, d, out) -> None:
    """ShapeError if a dilated window's taps all fall in the padding (torch would return -inf)."""
    for i in range(out):
        if not any(0 <= s * i - p + d * m < size for m in range(k)):
            raise ShapeError(f"pooling window {i} (kernel {k}, stride {s}, padding {p}, dilation {d}) "
                             f"sees only padding of an input of size {size}",
                             fix="reduce the padding or the dilation")


def _windows(xp, k, s, d, out):
    """All kH*kW taps of every window, stacked last: (..., H_out, W_out, kH*kW)."""
    return torch.stack([shifted_view(xp, m, n, out, s, d) for m in range(k[0]) for n in range(k[1])], -1)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """out[i, j] = max_{m, n} x[s*i - p + d*m, s*j - p + d*n], padding = -inf.

    Returns (values, indices); indices[b, c, i, j] = h*W + w, the position of the maximum in the
    flattened H*W plane of the (unpadded) input, as F.max_pool2d(..., return_indices=True) gives.
    Ties go to the first tap in row-major order, as in torch. A dilated window whose taps all fall
    in the padding is a ShapeError (torch returns -inf there).
    stride defaults to kernel_size; every size argument is an int or an (H, W) pair.
    """
    k, s, p, d, out, extra = _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode)
    height, width = x.shape[-2:]
    for a in (0, 1):
        _check_windows_see_input(x.shape[2 + a], k[a], s[a], p[a], d[a], out[a])
    pads = (p[1], p[1] + extra[1], p[0], p[0] + extra[0])
    xp = F.pad(x, pads, value=float("-inf"))
    flat_index = torch.arange(height * width, device=x.device).view(1, 1, height, width)
    ip = F.pad(flat_index, pads, value=-1)  # padding never wins, its index is never used
    values, which = _windows(xp, k, s, d, out).max(dim=-1)
    indices = _windows(ip, k, s, d, out).expand(*x.shape[:2], -1, -1, -1)
    return values, indices.gather(-1, which.unsqueeze(-1)).squeeze(-1)


def mean_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                count_include_pad: bool = True) -> torch.Tensor:
    """out[i, j] = sum_{m, n} xp[s*i + m, s*j + n] / count[i, j], xp = x zero-padded by p.

    count is the number of window pixels inside the input plus (count_include_pad) its zero
    padding; a ceil_mode window that hangs off beyond the padding does not count the part outside,
    as in F.avg_pool2d. stride defaults to kernel_size.
    """
    k, s, p, d, out, extra = _pool_geometry(x, kernel_size, stride, padding, 1, ceil_mode)
    height, width = x.shape[-2:]
    pads = (p[1], p[1] + extra[1], p[0], p[0] + extra[0])
    counted = x.new_ones(1, 1, height + 2 * p[0], width + 2 * p[1]) if count_include_pad \
        else F.pad(x.new_ones(1, 1, height, width), (p[1], p[1], p[0], p[0]))
    counted = F.pad(counted, (0, extra[1], 0, extra[0]))
    total = _windows(F.pad(x, pads), k, s, d, out).sum(-1)
    return total / _windows(counted, k, s, d, out).sum(-1)
