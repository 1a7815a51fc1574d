"""Transposed convolution, written as the scatter the chapter draws.

Each input pixel x[i, j] stamps a copy of the kernel, scaled by its value, into the output; the
stamp moves `stride` output pixels for each input pixel:

    full[s*i + d*m, s*j + d*n] += x[i, j] * w[m, n]          for every input (i, j), kernel (m, n)

then `padding` rows/columns are cropped from each side of `full` (and `output_padding` extra
rows/columns are kept at the bottom/right), so

    out size = (n - 1)*s - 2p + d*(k - 1) + output_padding + 1

With channels: input channel c of group g stamps w[c, o] onto output channel g*C_out_g + o.
The loop below runs over kernel offsets (m, n) instead of input pixels: offset (m, n) adds the
whole input, scaled by w[:, :, m, n], onto the output pixels (s*i + d*m, s*j + d*n) - the same sum,
K*K Python iterations. It is the adjoint (gradient) of `cnnkit.ops.conv.conv2d`.
"""

from __future__ import annotations

import torch

from cnnkit.errors import ShapeError
from cnnkit.ops.conv import check_ndim, shifted_view
from cnnkit.ops.sizes import _pair, conv_transpose_output_size


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride=1, padding=0, output_padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """full[o, s*i + d*m, s*j + d*n] += x[c, i, j] * w[c, o, m, n]; crop `padding`; add bias.

    A 3x3 kernel with stride 2 and padding 1 maps a 2x2 input to 3x3 ((2-1)*2 - 2 + 2 + 1 = 3),
    and to 4x4 with output_padding=1: the chapter's figure shows the 4x4 case.
    x: (N, C_in, H, W); weight: (C_in, C_out / groups, kH, kW), torch's layout; bias: (C_out,).
    stride, padding, output_padding, dilation: an int or an (H, W) pair; output_padding < stride
    (or < dilation). Returns (N, C_out, H_out, W_out).
    """
    check_ndim(x, 4, "input", "(N, C_in, H, W)")
    check_ndim(weight, 4, "weight", "(C_in, C_out/groups, kH, kW)")
    s, p, op, d = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)
    n_batch, c_in, height, width = x.shape
    if weight.shape[0] != c_in:
        raise ShapeError(f"weight has {weight.shape[0]} input channels (dim 0) but the input has {c_in}")
    if groups < 1 or c_in % groups:
        raise ShapeError(f"groups={groups} must divide the {c_in} input channels")
    _, c_out_g, kh, kw = weight.shape
    c_out = c_out_g * groups
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ShapeError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    axes = ((height, kh), (width, kw))
    out_h, out_w = (conv_transpose_output_size(n, k, s[a], p[a], op[a], d[a])
                    for a, (n, k) in enumerate(axes))

    xg = x.reshape(n_batch, groups, c_in // groups, height, width)
    w = weight.reshape(groups, c_in // groups, c_out_g, kh, kw)
    full_size = [(n - 1) * s[a] + d[a] * (k - 1) + 1 + op[a] for a, (n, k) in enumerate(axes)]
    full = x.new_zeros(n_batch, groups, c_out_g, *full_size)
    for m in range(kh):
        for n in range(kw):
            stamp = torch.einsum("bgchw,gco->bgohw", xg, w[..., m, n])
            shifted_view(full, m, n, (height, width), s, d).add_(stamp)
    out = full.reshape(n_batch, c_out, *full_size)[..., p[0]:p[0] + out_h, p[1]:p[1] + out_w]
    return out if bias is None else out + bias.view(1, c_out, 1, 1)


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int = 1, padding: int = 0, output_padding: int = 0) -> torch.Tensor:
    """full[o, s*i + m] += x[c, i] * w[c, o, m]; crop `padding` from each end; add bias.

    The chapter's 1-D example: input [1, 2], kernel [1, 1, 1], stride 2 gives the stamps
    [1, 1, 1, 0, 0] + [0, 0, 2, 2, 2] = [1, 1, 3, 2, 2]; padding 1 crops it to [1, 3, 2].
    x: (N, C_in, L); weight: (C_in, C_out, K); bias: (C_out,). Output length
    (L - 1)*s - 2p + K + output_padding, output_padding < stride.
    """
    check_ndim(x, 3, "input", "(N, C_in, L)")
    check_ndim(weight, 3, "weight", "(C_in, C_out, K)")
    n_batch, c_in, length = x.shape
    if weight.shape[0] != c_in:
        raise ShapeError(f"weight has {weight.shape[0]} input channels (dim 0) but the input has {c_in}")
    _, c_out, k = weight.shape
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ShapeError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    out_len = conv_transpose_output_size(length, k, stride, padding, output_padding)
    full = x.new_zeros(n_batch, c_out, (length - 1) * stride + k + output_padding)
    for m in range(k):
        full[..., m:m + stride * (length - 1) + 1:stride] += torch.einsum("bci,co->boi", x, weight[..., m])
    out = full[..., padding:padding + out_len]
    return out if bias is None else out + bias.view(1, c_out, 1)
