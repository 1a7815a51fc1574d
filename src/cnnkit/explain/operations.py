"""The chapter's figures for the operations, computed with `cnnkit.ops` on small integer grids.

Every number a panel shows comes from the `cnnkit.ops` function the panel is named after; the
spelled-out sums are built term by term from the same grids, so the reader can check one output
pixel by hand (and the tests check it against `torch.nn.functional`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit import ops
from cnnkit.errors import UsageError
from cnnkit.explain.panels import Explanation, Panel, box_mask, format_number, term
from cnnkit.ops.conv import resolve_activation

MAX_GRID = 12          # the largest input side drawn with readable numbers
MAX_STAMP_GRID = 4     # conv-transpose draws one panel per input pixel
MAX_KERNEL = 7
MAX_CHANNELS = 8


def random_ints(generator: torch.Generator, low: int, high: int, *shape: int) -> torch.Tensor:
    """Integers in [low, high] as float32 (exact: every sum here stays far below 2**24)."""
    return torch.randint(low, high + 1, shape, generator=generator).to(torch.float32)


def check_range(name: str, value: int, low: int, high: int | None = None, why: str = "") -> int:
    """UsageError unless low <= value <= high (an int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise UsageError(f"{name} must be {limit}, got {value}{why}", fix=f"use a {name} of {limit}")
    return value


def _position(at, out_h: int, out_w: int) -> tuple[int, int]:
    """The output pixel to spell out: `at` (row, col), by default the centre."""
    if at is None:
        return out_h // 2, out_w // 2
    i, j = at
    if not (0 <= i < out_h and 0 <= j < out_w):
        raise UsageError(f"position ({i}, {j}) is outside the {out_h}x{out_w} output",
                         fix=f"use a row in 0..{out_h - 1} and a column in 0..{out_w - 1}")
    return i, j


def _fmt(v, decimals: int = 0) -> str:
    return format_number(float(v), decimals)


# --- K x K convolution ---------------------------------------------------------------------------

def explain_conv(*, input_size: int = 5, kernel: int = 3, stride: int = 1, padding: int = 0,
                 activation: str = "relu", at=None, seed: int = 0) -> Explanation:
    """A K x K kernel sliding over a small input: the weighted sum at one position, then every output.

    h[i, j] = a(b + sum_m sum_n w[m, n] * xp[s*i + m, s*j + n]), xp the input zero-padded by p.
    """
    check_range("input size", input_size, 1, MAX_GRID)
    check_range("kernel", kernel, 1, MAX_KERNEL)
    check_range("stride", stride, 1)
    check_range("padding", padding, 0, MAX_KERNEL)
    act = resolve_activation(activation)
    g = torch.Generator().manual_seed(seed)
    x = random_ints(g, 0, 9, input_size, input_size)
    w = random_ints(g, -2, 2, kernel, kernel)
    b = random_ints(g, -3, 3, 1)
    out_h = ops.conv_output_size(input_size, kernel, stride, padding)  # ShapeError if the kernel is too big
    pre = ops.conv2d(x[None, None], w[None, None], b, stride=stride, padding=padding)[0, 0]
    out = ops.conv2d(x[None, None], w[None, None], b, stride=stride, padding=padding,
                     activation=activation)[0, 0]
    i, j = _position(at, out_h, out_h)

    xp = F.pad(x, (padding,) * 4)
    size = input_size + 2 * padding
    top, left = stride * i, stride * j
    weights = [float(w[m, n]) for m in range(kernel) for n in range(kernel)]
    pixels = [float(xp[top + m, left + n]) for m in range(kernel) for n in range(kernel)]
    total = sum(wt * px for wt, px in zip(weights, pixels)) + float(b[0])
    activated = float(act(torch.tensor(total)))
    decimals = 0 if activated == round(activated) else 2

    window = box_mask((size, size), top, left, kernel, kernel)
    padded = ~box_mask((size, size), padding, padding, input_size, input_size)
    name = activation if isinstance(activation, str) else "identity" if activation is None else "a"
    terms = " + ".join(term(wt, px) for wt, px in zip(weights, pixels))
    pre_panel = Panel(f"sum + bias ({out_h}x{out_h})", pre,
                      highlight=box_mask(tuple(pre.shape), i, j, 1, 1))
    rows = [[Panel(f"input {input_size}x{input_size}" + (f", padding {padding}" if padding else ""), xp,
                   highlight=window, dim=padded, note="(0) = zero padding" if padding else ""),
             Panel(f"kernel {kernel}x{kernel}, bias {_fmt(b[0])}", w),
             pre_panel]]
    if name != "identity":
        rows[0].append(Panel(f"{name} ({out_h}x{out_h})", out, highlight=box_mask(tuple(out.shape), i, j, 1, 1)))
    lines = [
        f"output size = floor(({input_size} + 2*{padding} - {kernel}) / {stride}) + 1 = {out_h}",
        f"window at output ({i}, {j}): input rows {top - padding}..{top - padding + kernel - 1}, "
        f"columns {left - padding}..{left - padding + kernel - 1} (stride {stride})",
        f"out[{i}, {j}] = {terms} + bias({_fmt(b[0])}) = {_fmt(total)}"
        + ("" if name == "identity" else f" -> {name} {_fmt(activated, decimals)}"),
    ]
    return Explanation(
        "conv", f"{kernel}x{kernel} convolution, stride {stride}, padding {padding}, activation {name}",
        rows, lines,
        data=dict(input=x, weight=w, bias=b, padded=xp, pre_activation=pre, output=out, position=(i, j),
                  weights=weights, pixels=pixels, spelled_sum=total, spelled_output=activated))


# --- subsampling and pooling ---------------------------------------------------------------------

def explain_pool(*, input_size: int = 4, kernel: int = 2, stride: int | None = None, padding: int = 0,
                 at=None, seed: int = 0) -> Explanation:
    """Subsampling (keep every s-th pixel), max pooling and mean pooling of the same input."""
    check_range("input size", input_size, 1, MAX_GRID)
    check_range("kernel", kernel, 1, MAX_KERNEL)
    stride = kernel if stride is None else stride
    check_range("stride", stride, 1)
    check_range("padding", padding, 0, kernel // 2, why=" (pooling padding is at most half the kernel)")
    g = torch.Generator().manual_seed(seed)
    x = random_ints(g, 0, 9, input_size, input_size)
    x4 = x[None, None]
    out_h = ops.pool_output_size(input_size, kernel, stride, padding)
    sub = ops.subsample(x, stride)
    mx, idx = ops.max_pool2d(x4, kernel, stride, padding)
    mean = ops.mean_pool2d(x4, kernel, stride, padding)
    mx, idx, mean = mx[0, 0], idx[0, 0], mean[0, 0]
    i, j = _position(at, out_h, out_h)

    n = input_size
    argmax = torch.zeros(n * n, dtype=torch.bool)
    argmax[idx.flatten()] = True
    kept = torch.zeros(n, n, dtype=torch.bool)
    kept[::stride, ::stride] = True
    top, left = stride * i - padding, stride * j - padding
    cells = [(r, c) for r in range(top, top + kernel) for c in range(left, left + kernel)]
    inside = [float(x[r, c]) for r, c in cells if 0 <= r < n and 0 <= c < n]
    window_max = max(inside)
    window_sum = sum(inside)
    window_mean = window_sum / (kernel * kernel)  # zero padding counts (count_include_pad, torch's default)
    rows = [[Panel(f"input {n}x{n}", x, highlight=argmax.view(n, n), note="[x] = a window's maximum"),
             Panel(f"input {n}x{n}", x, highlight=kept, note=f"[x] = kept by subsampling"),
             Panel(f"subsample, stride {stride}", sub),
             Panel(f"max pool {kernel}x{kernel}, stride {stride}", mx, highlight=box_mask(tuple(mx.shape), i, j, 1, 1)),
             Panel(f"mean pool {kernel}x{kernel}, stride {stride}", mean,
                   highlight=box_mask(tuple(mean.shape), i, j, 1, 1))]]
    listed = ", ".join(_fmt(v) for v in inside)
    lines = [
        f"pooled size = floor(({n} + 2*{padding} - {kernel}) / {stride}) + 1 = {out_h}; "
        f"subsampled size = ceil({n} / {stride}) = {sub.shape[-1]}",
        f"window ({i}, {j}): input rows {top}..{top + kernel - 1}, columns {left}..{left + kernel - 1}",
        f"  max pool:  max({listed}) = {_fmt(window_max)}   (index {int(idx[i, j])} = row "
        f"{int(idx[i, j]) // n} * {n} + column {int(idx[i, j]) % n}, kept for max-unpooling)",
        f"  mean pool: ({' + '.join(_fmt(v) for v in inside)}) / {kernel * kernel} = "
        f"{_fmt(window_mean, 2)}",
        f"  subsample: x[{stride}*{i}, {stride}*{j}] = {_fmt(sub[i, j]) if i < sub.shape[0] and j < sub.shape[1] else '-'}",
    ]
    return Explanation(
        "pool", f"downsampling a {n}x{n} input: subsample, max pool, mean pool", rows, lines,
        data=dict(input=x, subsample=sub, max=mx, indices=idx, mean=mean, position=(i, j),
                  window_values=inside, window_max=window_max, window_mean=window_mean))


# --- upsampling ----------------------------------------------------------------------------------

def explain_upsample(*, input_size: int = 3, stride: int = 2, seed: int = 0) -> Explanation:
    """Nearest (duplicate), max-unpooling (with a max pool's switches) and bilinear upsampling of the
    same small map by the factor `stride`. The map is the max pool of a larger random image, so
    max-unpooling has the positions of the maxima to put the values back at."""
    check_range("input size", input_size, 1, MAX_GRID)
    check_range("stride", stride, 1, 4, why=" (the upsampling factor)")
    f = stride
    big = input_size * f
    if big > 2 * MAX_GRID:
        raise UsageError(f"input size {input_size} x factor {f} = {big} is too large to draw",
                         fix=f"use input size x stride <= {2 * MAX_GRID}")
    g = torch.Generator().manual_seed(seed)
    image = random_ints(g, 0, 9, big, big)
    pooled, idx = ops.max_pool2d(image[None, None], f)
    nearest = ops.upsample_nearest(pooled, f)
    unpooled = ops.max_unpool2d(pooled, idx, f)
    bilinear = ops.upsample_bilinear(pooled, scale_factor=f, align_corners=False)
    pooled, idx, nearest, unpooled, bilinear = (t[0, 0] for t in (pooled, idx, nearest, unpooled, bilinear))

    switches = torch.zeros(big * big, dtype=torch.bool)
    switches[idx.flatten()] = True
    switches = switches.view(big, big)
    n = input_size
    rows = [[Panel(f"image {big}x{big}", image, highlight=switches, note="[x] = maxima (the switches)"),
             Panel(f"max pool {f}x{f} -> input {n}x{n}", pooled)],
            [Panel(f"nearest x{f} (duplicate)", nearest),
             Panel(f"max-unpool x{f} (switches)", unpooled, highlight=switches),
             Panel(f"bilinear x{f}", bilinear)]]

    # One bilinear pixel spelled out: source point (dst + 0.5) / f - 0.5, clamped at 0 (align_corners=False).
    oi = oj = min(1, big - 1)
    src = max((oi + 0.5) / f - 0.5, 0.0)
    y0 = min(int(src), n - 1)
    y1 = min(y0 + 1, n - 1)
    a = src - y0
    corners = [((1 - a) * (1 - a), y0, y0), ((1 - a) * a, y0, y1), (a * (1 - a), y1, y0), (a * a, y1, y1)]
    value = sum(wt * float(pooled[r, c]) for wt, r, c in corners)
    spelled = " + ".join(f"{wt:.4g}*{_fmt(pooled[r, c])}" for wt, r, c in corners)
    lines = [
        f"nearest:    out[i, j] = in[i // {f}, j // {f}]",
        f"max-unpool: each value goes back to where its maximum was (indices from the max pool), zeros elsewhere",
        f"bilinear (align_corners=False): out[{oi}, {oj}] samples the input at ({src:g}, {src:g}): "
        f"{spelled} = {value:.2f}",
    ]
    return Explanation(
        "upsample", f"upsampling a {n}x{n} map by {f}: nearest, max-unpool, bilinear", rows, lines,
        data=dict(image=image, input=pooled, indices=idx, nearest=nearest, unpooled=unpooled,
                  bilinear=bilinear, bilinear_pixel=(oi, oj), bilinear_value=value))


# --- transposed convolution ----------------------------------------------------------------------

def explain_conv_transpose(*, input_size: int = 2, kernel: int = 3, stride: int = 2, padding: int = 1,
                           output_padding: int = 0, seed: int = 0) -> Explanation:
    """Each input pixel stamps the kernel, scaled by its value, into the output, `stride` pixels apart;
    the stamps add up, and `padding` rows/columns are cropped from each side."""
    check_range("input size", input_size, 1, MAX_STAMP_GRID, why=" (one panel per input pixel)")
    check_range("kernel", kernel, 1, MAX_KERNEL)
    check_range("stride", stride, 1, MAX_KERNEL)
    check_range("padding", padding, 0, MAX_KERNEL)
    check_range("output padding", output_padding, 0)
    n, k, s, p, op = input_size, kernel, stride, padding, output_padding
    out_size = ops.conv_transpose_output_size(n, k, s, p, op)  # ShapeError for an impossible geometry
    g = torch.Generator().manual_seed(seed)
    x = random_ints(g, 1, 3, n, n)
    w = random_ints(g, -1, 2, k, k)
    out = ops.conv_transpose2d(x[None, None], w[None, None], stride=s, padding=p, output_padding=op)[0, 0]

    full = (n - 1) * s + k + op
    cropped = ~box_mask((full, full), p, p, out_size, out_size)
    stamps, stamp_rows = {}, []
    for i in range(n):
        row = []
        for j in range(n):
            stamp = torch.zeros(full, full)
            stamp[s * i:s * i + k, s * j:s * j + k] = x[i, j] * w
            stamps[(i, j)] = stamp
            row.append(Panel(f"x[{i},{j}]={_fmt(x[i, j])} stamps {_fmt(x[i, j])}*kernel at ({s * i},{s * j})",
                             stamp, highlight=box_mask((full, full), s * i, s * j, k, k), dim=cropped))
        stamp_rows.append(row)
    total = sum(stamps.values())
    crop_note = f"(x) = cropped by padding {p}" if p else ""
    rows = [[Panel(f"input {n}x{n}", x), Panel(f"kernel {k}x{k}", w)], *stamp_rows,
            [Panel(f"sum of the stamps ({full}x{full})", total, dim=cropped, note=crop_note),
             Panel(f"output {out_size}x{out_size} (conv_transpose2d)", out)]]
    lines = [
        f"full size = (n - 1)*s + k + output_padding = ({n} - 1)*{s} + {k} + {op} = {full}",
        f"output size = (n - 1)*s - 2p + (k - 1) + output_padding + 1 = ({n} - 1)*{s} - 2*{p} + ({k} - 1) "
        f"+ {op} + 1 = {out_size}",
    ]
    if p:
        lines.append(f"padding {p} crops {p} row(s)/column(s) from each side of the {full}x{full} sum"
                     + (f" (output_padding {op} keeps {op} more at the bottom/right)" if op else ""))
    return Explanation(
        "conv-transpose", f"{k}x{k} transposed convolution, stride {s}, padding {p}: {n}x{n} -> "
                          f"{out_size}x{out_size}", rows, lines,
        data=dict(input=x, weight=w, stamps=stamps, full=total, output=out, output_size=out_size,
                  crop=(p, out_size)))


# --- 1x1 convolution -----------------------------------------------------------------------------

def explain_conv1x1(*, input_size: int = 3, in_channels: int = 3, out_channels: int = 2, at=None,
                    seed: int = 0) -> Explanation:
    """A C_in x H x W input mixed into C_out channels: each output pixel is a weighted sum of the
    input channels at the same position, the same weights everywhere (one FC layer per pixel)."""
    check_range("input size", input_size, 1, MAX_GRID)
    check_range("in channels", in_channels, 1, MAX_CHANNELS)
    check_range("out channels", out_channels, 1, MAX_CHANNELS)
    g = torch.Generator().manual_seed(seed)
    x = random_ints(g, 0, 9, in_channels, input_size, input_size)
    w = random_ints(g, -2, 2, out_channels, in_channels)
    b = random_ints(g, -2, 2, out_channels)
    out = ops.conv1x1(x[None], w, b)[0]
    i, j = _position(at, input_size, input_size)
    here = box_mask((input_size, input_size), i, j, 1, 1)
    rows = [[Panel(f"input channel {c}", x[c], highlight=here) for c in range(in_channels)],
            [Panel(f"weights w[o, c] ({out_channels}x{in_channels})", w),
             Panel("bias", b[:, None])],
            [Panel(f"output channel {o}", out[o], highlight=here) for o in range(out_channels)]]
    lines, spelled = [], []
    for o in range(out_channels):
        value = sum(float(w[o, c]) * float(x[c, i, j]) for c in range(in_channels)) + float(b[o])
        spelled.append(value)
        terms = " + ".join(term(float(w[o, c]), float(x[c, i, j])) for c in range(in_channels))
        lines.append(f"out[{o}, {i}, {j}] = {terms} + bias({_fmt(b[o])}) = {_fmt(value)}")
    lines.append("the same weights at every pixel: a fully connected layer C_in -> C_out applied per position")
    return Explanation(
        "conv1x1", f"1x1 convolution: {in_channels} channels -> {out_channels} channels", rows, lines,
        data=dict(input=x, weight=w, bias=b, output=out, position=(i, j), spelled=spelled))
