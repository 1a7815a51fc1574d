"""cnnkit.ops against torch.nn.functional: values and gradients, over randomised geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit.errors import CnnkitError, ShapeError
from cnnkit.ops import (LayerGeometry, conv1x1, conv2d, conv_output_size, conv_transpose1d,
                        conv_transpose2d, conv_transpose_output_size, max_pool2d, max_unpool2d,
                        mean_pool2d, pool_output_size, receptive_field, receptive_fields, subsample,
                        upsample_bilinear, upsample_nearest)

TOL = dict(rtol=1e-5, atol=1e-5)
FEW = settings(max_examples=40, deadline=None)
SOME = settings(max_examples=60, deadline=None)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)


def assert_same(ours, ref, inputs, gen):
    """ours(*inputs) == ref(*inputs) in value, and in the gradient w.r.t. every input."""
    a, b = ours(*inputs), ref(*inputs)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, **TOL)
    cotangent = torch.randn(b.shape, generator=gen, dtype=b.dtype)
    ga = torch.autograd.grad(a, inputs, cotangent)
    gb = torch.autograd.grad(b, inputs, cotangent)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **TOL)


@st.composite
def axis(draw, max_kernel=4, max_stride=4, max_dilation=3, pool=False):
    """(size, kernel, stride, padding, dilation) along one axis, with the kernel fitting the
    padded input; stride may exceed the kernel; pooling keeps padding <= kernel // 2."""
    k = draw(st.integers(1, max_kernel))
    s = draw(st.integers(1, max_stride))
    d = draw(st.integers(1, max_dilation))
    p = draw(st.integers(0, k // 2 if pool else 2))
    span = d * (k - 1) + 1
    n = draw(st.integers(max(1, span - 2 * p), span + 6))
    return n, k, s, p, d


seeds = st.integers(0, 2**31 - 1)
activations = st.sampled_from([None, "relu", "leaky_relu", "sigmoid", "tanh", "identity", F.gelu])
ACT_REF = {None: lambda t: t, "identity": lambda t: t, "relu": F.relu, "leaky_relu": F.leaky_relu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}


# --------------------------------------------------------------------------- convolution

@SOME
@given(axis(), axis(), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),
       st.booleans(), activations, seeds)
def test_conv2d_matches_torch(ah, aw, groups, cin_g, cout_g, batch, use_bias, act, seed):
    gen = torch.Generator().manual_seed(seed)
    (h, kh, sh, ph, dh), (w, kw, sw, pw, dw) = ah, aw
    x = rand(gen, batch, cin_g * groups, h, w)
    weight = rand(gen, cout_g * groups, cin_g, kh, kw)
    inputs = [x, weight] + ([rand(gen, cout_g * groups)] if use_bias else [])
    geo = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups)
    ref_act = act if callable(act) else ACT_REF[act]
    assert_same(lambda *t: conv2d(*t, **geo, activation=act),
                lambda *t: ref_act(F.conv2d(*t, **geo)), inputs, gen)


def test_conv2d_chapter_formula_single_channel():
    """h[i, j] = beta + sum_m sum_n w[m, n] x[i + m - k, j + n - k], zero outside, written literally."""
    gen = torch.Generator().manual_seed(0)
    x, w, beta, k = torch.randn(5, 6, generator=gen), torch.randn(3, 3, generator=gen), 0.7, 1
    expected = torch.zeros(5, 6)
    for i in range(5):
        for j in range(6):
            total = beta
            for m in range(2 * k + 1):
                for n in range(2 * k + 1):
                    if 0 <= i + m - k < 5 and 0 <= j + n - k < 6:
                        total += w[m, n] * x[i + m - k, j + n - k]
            expected[i, j] = total
    got = conv2d(x[None, None], w[None, None], torch.tensor([beta]), padding=k)[0, 0]
    torch.testing.assert_close(got, expected)


@FEW
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6),
       st.booleans(), st.booleans(), seeds)
def test_conv1x1_is_a_linear_layer_at_every_position(cin, cout, h, w, four_d, use_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, h, w, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(cin, cout, bias=use_bias, dtype=torch.float64)
    weight = linear.weight.detach()
    bias = linear.bias.detach() if use_bias else None
    per_position = linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N,H,W,C) -> Linear -> back
    got = conv1x1(x, weight[:, :, None, None] if four_d else weight, bias)
    torch.testing.assert_close(got, per_position.detach(), **TOL)
    torch.testing.assert_close(got, F.conv2d(x, weight[:, :, None, None], bias), **TOL)


def test_conv1x1_gradients():
    gen = torch.Generator().manual_seed(1)
    inputs = [rand(gen, 2, 3, 4, 5), rand(gen, 6, 3), rand(gen, 6)]
    assert_same(conv1x1, lambda x, w, b: F.conv2d(x, w[:, :, None, None], b), inputs, gen)


# --------------------------------------------------------------------------- pooling

@SOME
@given(axis(pool=True), axis(pool=True), st.booleans(), seeds)
def test_max_pool2d_matches_torch_values_indices_and_gradient(ah, aw, ceil_mode, seed):
    gen = torch.Generator().manual_seed(seed)
    (h, kh, sh, ph, dh), (w, kw, sw, pw, dw) = ah, aw
    x = rand(gen, 2, 3, h, w)
    geo = dict(kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
               ceil_mode=ceil_mode)
    ref_values, ref_indices = F.max_pool2d(x, **geo, return_indices=True)
    if torch.isinf(ref_values).any():  # a dilated window that sees only padding
        with pytest.raises(ShapeError, match="sees only padding"):
            max_pool2d(x, **geo)
        return
    values, indices = max_pool2d(x, **geo)
    assert torch.equal(indices, ref_indices)
    assert_same(lambda t: max_pool2d(t, **geo)[0], lambda t: F.max_pool2d(t, **geo), [x], gen)


@FEW
@given(axis(pool=True, max_dilation=2), axis(pool=True, max_dilation=2), st.booleans(), seeds)
def test_max_pool2d_ties_pick_the_same_index_as_torch(ah, aw, ceil_mode, seed):
    (h, kh, sh, ph, dh), (w, kw, sw, pw, dw) = ah, aw
    x = torch.randint(0, 3, (2, 3, h, w), generator=torch.Generator().manual_seed(seed)).double()
    geo = dict(kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
               ceil_mode=ceil_mode)
    ref_values, ref_indices = F.max_pool2d(x, **geo, return_indices=True)
    if not torch.isinf(ref_values).any():
        values, indices = max_pool2d(x, **geo)
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@SOME
@given(axis(pool=True, max_dilation=1), axis(pool=True, max_dilation=1), st.booleans(),
       st.booleans(), st.booleans(), seeds)
def test_mean_pool2d_matches_avg_pool2d(ah, aw, ceil_mode, count_include_pad, default_stride, seed):
    gen = torch.Generator().manual_seed(seed)
    (h, kh, sh, ph, _), (w, kw, sw, pw, _) = ah, aw
    geo = dict(kernel_size=(kh, kw), stride=None if default_stride else (sh, sw), padding=(ph, pw),
               ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert_same(lambda t: mean_pool2d(t, **geo), lambda t: F.avg_pool2d(t, **geo),
                [rand(gen, 2, 3, h, w)], gen)


@FEW
@given(st.integers(1, 9), st.integers(1, 9), seeds)
def test_subsample_keeps_every_other_pixel(h, w, seed):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(subsample(x), x[..., ::2, ::2])
    assert torch.equal(subsample(x, stride=(3, 2), offset=(1, 1)), x[..., 1::3, 1::2])
    assert torch.equal(subsample(x), F.max_pool2d(x, kernel_size=1, stride=2))


# --------------------------------------------------------------------------- upsampling

@FEW
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), seeds)
def test_upsample_nearest_matches_interpolate(h, w, fh, fw, seed):
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, 2, 3, h, w)
    assert_same(lambda t: upsample_nearest(t, (fh, fw)),
                lambda t: F.interpolate(t, scale_factor=(fh, fw), mode="nearest"), [x], gen)
    assert_same(lambda t: upsample_nearest(t, fh),
                lambda t: F.interpolate(t, scale_factor=fh, mode="nearest"), [x], gen)


@SOME
@given(st.integers(1, 8), st.integers(1, 8), st.booleans(), st.booleans(),
       st.tuples(st.floats(0.4, 3.5), st.floats(0.4, 3.5)),
       st.tuples(st.integers(1, 12), st.integers(1, 12)),
       seeds)
def test_upsample_bilinear_matches_interpolate(h, w, align_corners, by_size, factors, size, seed):
    gen = torch.Generator().manual_seed(seed)
    if not by_size and min(int(h * factors[0]), int(w * factors[1])) < 1:
        factors = (max(factors[0], 1.0), max(factors[1], 1.0))
    how = dict(size=size) if by_size else dict(scale_factor=factors)
    assert_same(lambda t: upsample_bilinear(t, **how, align_corners=align_corners),
                lambda t: F.interpolate(t, **how, mode="bilinear", align_corners=align_corners),
                [rand(gen, 2, 3, h, w)], gen)


def test_upsample_bilinear_uses_the_given_scale_factor_not_the_size_ratio():
    """floor(5 * 1.5) = 7, but source coordinates use 1/1.5, not 5/7, as torch does."""
    x = torch.arange(25.0, dtype=torch.float64).view(1, 1, 5, 5)
    by_factor = upsample_bilinear(x, scale_factor=1.5)
    torch.testing.assert_close(by_factor, F.interpolate(x, scale_factor=1.5, mode="bilinear"))
    assert not torch.allclose(by_factor, upsample_bilinear(x, size=7))


@SOME
@given(axis(pool=True, max_dilation=1), axis(pool=True, max_dilation=1), st.booleans(),
       st.booleans(), seeds)
def test_max_unpool2d_matches_torch(ah, aw, explicit_size, default_stride, seed):
    gen = torch.Generator().manual_seed(seed)
    (h, kh, sh, ph, _), (w, kw, sw, pw, _) = ah, aw
    stride = None if default_stride else (sh, sw)
    geo = dict(kernel_size=(kh, kw), stride=stride, padding=(ph, pw))
    x = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64)
    pooled, indices = F.max_pool2d(x, **geo, return_indices=True)
    s = (kh, kw) if stride is None else stride
    default = [(pooled.shape[2 + a] - 1) * s[a] - 2 * (ph, pw)[a] + (kh, kw)[a] for a in (0, 1)]
    fits = all(default[a] - s[a] < (h, w)[a] < default[a] + s[a] for a in (0, 1))
    out_size = (h, w) if explicit_size and fits else None
    size = out_size or default
    pooled = pooled.requires_grad_(True)
    if min(size) < 1 or int(indices.max()) >= size[0] * size[1]:
        with pytest.raises(ShapeError):  # torch refuses these too: indices outside the output plane
            max_unpool2d(pooled, indices, **geo, output_size=out_size)
        return
    assert_same(lambda t: max_unpool2d(t, indices, **geo, output_size=out_size),
                lambda t: F.max_unpool2d(t, indices, **geo, output_size=out_size), [pooled], gen)


def test_max_unpool_puts_values_back_at_the_max_pool_indices():
    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(3))
    values, indices = max_pool2d(x, 2)
    restored = max_unpool2d(values, indices, 2)
    assert restored.shape == x.shape
    flat, xflat = restored.flatten(2), x.flatten(2)
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter(2, indices.flatten(2), True)
    assert torch.equal(flat[kept], xflat[kept])           # the maxima are back where they were
    assert torch.equal(flat[~kept], torch.zeros_like(flat[~kept]))  # zeros elsewhere
    assert kept.sum() == values.numel()
    assert torch.equal(flat.gather(2, indices.flatten(2)), values.flatten(2))


# --------------------------------------------------------------------------- transposed convolution

@SOME
@given(st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2),
                 st.integers(1, 3), st.integers(0, 3)).filter(lambda a: a[5] < max(a[2], a[4])),
       st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2),
                 st.integers(1, 3), st.integers(0, 3)).filter(lambda a: a[5] < max(a[2], a[4])),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.booleans(), seeds)
def test_conv_transpose2d_matches_torch(ah, aw, groups, cin_g, cout_g, use_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    (h, kh, sh, ph, dh, oph), (w, kw, sw, pw, dw, opw) = ah, aw
    geo = dict(stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw), dilation=(dh, dw),
               groups=groups)
    sizes = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, d, op in (ah, aw)]
    if min(sizes) < 1:
        with pytest.raises(ShapeError):
            conv_transpose2d(rand(gen, 1, groups, h, w), rand(gen, groups, 1, kh, kw), **geo)
        return
    x = rand(gen, 2, cin_g * groups, h, w)
    weight = rand(gen, cin_g * groups, cout_g, kh, kw)
    inputs = [x, weight] + ([rand(gen, cout_g * groups)] if use_bias else [])
    assert_same(lambda *t: conv_transpose2d(*t, **geo), lambda *t: F.conv_transpose2d(*t, **geo),
                inputs, gen)


@FEW
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(0, 3),
       st.booleans(), seeds)
def test_conv_transpose1d_matches_torch(length, k, stride, padding, output_padding, use_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    if output_padding >= stride or (length - 1) * stride - 2 * padding + k + output_padding < 1:
        with pytest.raises(ShapeError):
            conv_transpose1d(rand(gen, 1, 1, length), rand(gen, 1, 1, k), None, stride, padding,
                             output_padding)
        return
    inputs = [rand(gen, 2, 3, length), rand(gen, 3, 2, k)] + ([rand(gen, 2)] if use_bias else [])
    geo = dict(stride=stride, padding=padding, output_padding=output_padding)
    assert_same(lambda *t: conv_transpose1d(*t, **geo), lambda *t: F.conv_transpose1d(*t, **geo),
                inputs, gen)


def test_conv_transpose1d_chapter_example():
    x, w = torch.tensor([[[1.0, 2.0]]]), torch.ones(1, 1, 3)
    assert conv_transpose1d(x, w, stride=2).flatten().tolist() == [1, 1, 3, 2, 2]
    assert conv_transpose1d(x, w, stride=2, padding=1).flatten().tolist() == [1, 3, 2]


def test_docstring_claim_3x3_stride2_padding1_maps_2x2_to_3x3_and_4x4():
    assert "2x2 input to 3x3" in conv_transpose2d.__doc__ and "4x4" in conv_transpose2d.__doc__
    x, w = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 3, 3)
    assert conv_transpose2d(x, w, stride=2, padding=1).shape[-2:] == (3, 3)
    assert conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).shape[-2:] == (4, 4)
    assert F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).shape[-2:] == (4, 4)
    assert conv_transpose_output_size(2, 3, 2, 1) == 3
    assert conv_transpose_output_size(2, 3, 2, 1, output_padding=1) == 4


# --------------------------------------------------------------------------- errors a user can cause

def test_kernel_larger_than_padded_input_is_a_shape_error():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ShapeError, match="kernel spans 5 pixels"):
        conv2d(x, torch.randn(1, 1, 5, 5))
    with pytest.raises(ShapeError):
        conv2d(x, torch.randn(1, 1, 3, 3), dilation=2)  # spans 5 > 4
    with pytest.raises(ShapeError):
        max_pool2d(x, 5, padding=0)
    with pytest.raises(ShapeError):
        mean_pool2d(x, 6, padding=0, ceil_mode=True)
    with pytest.raises(ShapeError):
        conv_output_size(4, 5)
    with pytest.raises(ShapeError):
        pool_output_size(4, 5)
    assert conv_output_size(4, 5, padding=1) == 2  # padding makes it fit


def test_other_invalid_geometry_is_a_shape_error():
    x = torch.randn(1, 4, 5, 5)
    cases = [
        lambda: conv2d(x, torch.randn(3, 2, 3, 3), groups=2),          # 3 out channels, 2 groups
        lambda: conv2d(x, torch.randn(4, 3, 3, 3), groups=2),          # weight wants 6 in channels
        lambda: conv2d(x[0], torch.randn(4, 4, 3, 3)),                 # missing batch dimension
        lambda: conv2d(x, torch.randn(4, 4, 3, 3), torch.randn(3)),    # bias size
        lambda: conv1x1(x, torch.randn(2, 3)),
        lambda: conv_transpose2d(x, torch.randn(4, 1, 3, 3), stride=2, output_padding=2),
        lambda: conv_transpose2d(x, torch.randn(4, 1, 3, 3), groups=3),
        lambda: conv_transpose1d(x[:, :, 0], torch.randn(5, 1, 3), stride=2),  # 5 vs 4 channels
        lambda: conv_transpose1d(x[:, :, 0], torch.randn(4, 1, 3), stride=2, output_padding=2),
        lambda: conv_transpose_output_size(3, 3, stride=1, output_padding=1),
        lambda: max_pool2d(x, 2, padding=2),                           # padding > kernel / 2
        lambda: max_pool2d(x[0], 2),
        lambda: max_pool2d(x[..., :2], (1, 2), stride=1, padding=(0, 1), dilation=(1, 3)),  # taps -1, 2
        lambda: max_unpool2d(torch.randn(1, 1, 2, 2), torch.tensor([[[[0, 1], [2, 99]]]]), 2),
        lambda: max_unpool2d(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 2,
                             output_size=(7, 4)),
        lambda: upsample_nearest(x, 1.5),
        lambda: upsample_bilinear(x),
        lambda: upsample_bilinear(x, scale_factor=0.1),
        lambda: subsample(x, stride=2, offset=2),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ShapeError):
            case()
            pytest.fail(f"case {i} did not raise")
    assert issubclass(ShapeError, ValueError)


def test_unknown_activation_is_a_cnnkit_error():
    with pytest.raises(CnnkitError, match="unknown activation"):
        conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), activation="swishy")


# --------------------------------------------------------------------------- size arithmetic

def torch_raises(fn):
    try:
        return fn(), False
    except RuntimeError:
        return None, True


@SOME
@given(axis(max_kernel=5), st.integers(1, 4), seeds)
def test_conv_output_size_is_the_shape_torch_produces(a, _, seed):
    n, k, s, p, d = a
    out = F.conv2d(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0),
                   dilation=(d, 1))
    assert conv_output_size(n, k, s, p, d) == out.shape[2]


@SOME
@given(st.integers(1, 10), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2), st.integers(1, 3),
       st.booleans())
def test_pool_output_size_is_the_shape_torch_produces(n, k, s, p, d, ceil_mode):
    geo = dict(kernel_size=(k, 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1), ceil_mode=ceil_mode)
    out, refused = torch_raises(lambda: F.max_pool2d(torch.zeros(1, 1, n, 1), **geo))
    if p > k // 2 or d * (k - 1) + 1 > n + 2 * p:
        # torch refuses padding > k/2 too; a window larger than the padded input is refused here
        # even where torch's ceil_mode would still produce one output pixel
        with pytest.raises(ShapeError):
            pool_output_size(n, k, s, p, d, ceil_mode)
        return
    assert not refused
    assert pool_output_size(n, k, s, p, d, ceil_mode) == out.shape[2]
    if d == 1:
        avg = F.avg_pool2d(torch.zeros(1, 1, n, 1), (k, 1), (s, 1), (p, 0), ceil_mode)
        assert pool_output_size(n, k, s, p, 1, ceil_mode) == avg.shape[2]


@SOME
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3), st.integers(0, 3),
       st.integers(1, 3))
def test_conv_transpose_output_size_is_the_shape_torch_produces(n, k, s, p, op, d):
    out, refused = torch_raises(lambda: F.conv_transpose2d(
        torch.zeros(1, 1, n, 1), torch.zeros(1, 1, k, 1), stride=(s, 1), padding=(p, 0),
        output_padding=(op, 0), dilation=(d, 1)))
    if refused:
        with pytest.raises(ShapeError):
            conv_transpose_output_size(n, k, s, p, op, d)
    else:
        assert conv_transpose_output_size(n, k, s, p, op, d) == out.shape[2]


def test_receptive_field_of_hand_worked_stacks():
    conv3 = LayerGeometry(kernel_size=3, stride=1, padding=1)
    pool2 = LayerGeometry(kernel_size=2, stride=2)
    assert receptive_field([conv3, conv3]).receptive_field == 5
    assert receptive_field([conv3, conv3, conv3]).receptive_field == 7
    stack = receptive_field([conv3, pool2, conv3])
    assert (stack.receptive_field, stack.total_stride) == (8, 2)
    assert [f.receptive_field for f in receptive_fields([conv3, pool2, conv3])] == [3, 4, 8]
    assert receptive_field([]).receptive_field == 1
    assert receptive_field([LayerGeometry(3, dilation=2)] * 2).receptive_field == 9


@FEW
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)),
                min_size=1, max_size=4))
def test_receptive_field_equals_the_pixels_a_real_stack_looks_at(layers):
    """The gradient of output pixel (0, 0) of an all-positive conv/avg-pool stack w.r.t. the input
    is non-zero exactly over that pixel's receptive field."""
    geometry, modules = [], []
    for is_pool, k, s, d in layers:
        d = 1 if is_pool else d
        geometry.append(LayerGeometry(kernel_size=k, stride=s, dilation=d))
        if is_pool:
            modules.append(torch.nn.AvgPool2d(k, s))
        else:
            conv = torch.nn.Conv2d(1, 1, k, s, dilation=d, bias=False)
            torch.nn.init.constant_(conv.weight, 1.0)
            modules.append(conv)
    field = receptive_field(geometry)
    x = torch.zeros(1, 1, field.receptive_field + 4, field.receptive_field + 4, requires_grad=True)
    torch.nn.Sequential(*modules)(x)[0, 0, 0, 0].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    assert rows.min() == 0 and rows.max() + 1 == field.receptive_field
    assert field.start == field.receptive_field / 2  # centre of the field of output pixel 0
