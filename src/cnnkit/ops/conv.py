"""2D convolution written the way the chapter defines it.

For one channel and a (2k+1) x (2k+1) kernel centred on the output pixel, the chapter writes

    h[i, j] = a( beta + sum_m sum_n  w[m, n] * x[i + m - k, j + n - k] ),     m, n = 0 .. 2k

With zero padding k this is exactly what `torch.nn.functional.conv2d` computes (a cross-correlation:
the kernel is not flipped). Generalised to channels, stride s, dilation d and groups:

    out[b, o, i, j] = a( bias[o] + sum_{c,m,n} w[o, c, m, n] * xp[b, g*C_g + c, s*i + d*m, s*j + d*n] )

where xp is the input zero-padded by `padding` on every side, g = o // (C_out / groups) is the group of
output channel o, C_g = C_in / groups, and c runs over the C_g input channels of that group.

The code sums over the kernel offsets (m, n) explicitly: for each offset it takes the strided,
dilated, shifted view of the padded input that w[:, :, m, n] multiplies, and mixes its channels with
an einsum. That is K*K Python iterations; everything else is vectorised.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cnnkit.errors import ShapeError, UsageError
from cnnkit.ops.sizes import _pair, conv_output_size

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, torch's default
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def resolve_activation(activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a(.) for None (identity), a callable, or a name in `ACTIVATIONS`."""
    if activation is None:
        return ACTIVATIONS["identity"]
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise UsageError(f"unknown activation {activation!r}",
                     fix=f"use None, a callable, or one of {sorted(ACTIVATIONS)}")


def check_ndim(t: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    """ShapeError unless `t` has `ndim` dimensions (`layout` names them, e.g. "(N, C, H, W)")."""
    if t.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}",
                         fix="add a batch dimension with .unsqueeze(0)" if t.ndim == ndim - 1 else None)


def shifted_view(xp: torch.Tensor, m: int, n: int, out_size: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The view xp[..., s*i + d*m, s*j + d*n] for every output position (i, j): what tap (m, n) sees."""
    (oh, ow), (sh, sw), (dh, dw) = out_size, stride, dilation
    top, left = m * dh, n * dw
    return xp[..., top:top + sh * (oh - 1) + 1:sh, left:left + sw * (ow - 1) + 1:sw]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, activation=None) -> torch.Tensor:
    """out = a(bias + sum over channels c of the group, kernel rows m and columns n of
    w[o, c, m, n] * xp[c, s*i + d*m, s*j + d*n]); see the module docstring.

    x: (N, C_in, H, W); weight: (C_out, C_in / groups, kH, kW); bias: (C_out,) or None.
    stride, padding, dilation: an int or an (H, W) pair. activation: None, a callable or a name
    ("relu", "leaky_relu", "sigmoid", "tanh", "identity"). Returns (N, C_out, H_out, W_out).
    """
    check_ndim(x, 4, "input", "(N, C_in, H, W)")
    check_ndim(weight, 4, "weight", "(C_out, C_in/groups, kH, kW)")
    act = resolve_activation(activation)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n_batch, c_in, height, width = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups:
        raise ShapeError(f"groups={groups} must divide both the {c_in} input channels and the "
                         f"{c_out} output channels")
    if c_in_g * groups != c_in:
        raise ShapeError(f"weight expects {c_in_g * groups} input channels "
                         f"({c_in_g} per group x {groups} groups) but the input has {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ShapeError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    out_size = (conv_output_size(height, kh, stride[0], padding[0], dilation[0]),
                conv_output_size(width, kw, stride[1], padding[1], dilation[1]))

    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # zeros outside the image
    xp = xp.reshape(n_batch, groups, c_in_g, *xp.shape[-2:])          # b, g, c, H+2p, W+2p
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw)      # g, o, c, kH, kW
    out = x.new_zeros(n_batch, groups, c_out // groups, *out_size)
    for m in range(kh):
        for n in range(kw):
            view = shifted_view(xp, m, n, out_size, stride, dilation)
            out = out + torch.einsum("bgchw,goc->bgohw", view, w[..., m, n])
    out = out.reshape(n_batch, c_out, *out_size)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return act(out)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution: out[b, o, i, j] = bias[o] + sum_c w[o, c] * x[b, c, i, j].

    It mixes channels and nothing else: it is one fully connected layer (nn.Linear(C_in, C_out)
    with the same weight and bias) applied independently at every pixel position (i, j).
    x: (N, C_in, H, W); weight: (C_out, C_in) or (C_out, C_in, 1, 1); bias: (C_out,) or None.
    """
    check_ndim(x, 4, "input", "(N, C_in, H, W)")
    if weight.ndim == 4:
        if tuple(weight.shape[2:]) != (1, 1):
            raise ShapeError(f"conv1x1 needs a 1x1 kernel, got weight shape {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ShapeError(f"weight must be (C_out, {x.shape[1]}) or (C_out, {x.shape[1]}, 1, 1), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ShapeError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    out = torch.einsum("oc,bchw->bohw", weight, x)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
