"""`cnnkit explain`: the numbers each figure shows and spells out are those of the operation it draws,
checked against torch.nn.functional; the CLI writes a PNG per topic and reports bad options in one line."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.cli import main
from cnnkit.errors import CnnkitError
from cnnkit.explain import build_explanation, explain
from cnnkit.models.registry import build_model
from cnnkit.ops.sizes import conv_transpose_output_size

PRODUCT = re.compile(r"\(?(-?\d+(?:\.\d+)?)\)?\*\(?(-?\d+(?:\.\d+)?)\)?")


def spelled_line(text: str, prefix: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, (prefix, text)
    return lines[0]


def evaluate_spelled_sum(line: str) -> tuple[float, float]:
    """Recompute 'w*x + ... + bias(b) = V' from the printed products; returns (recomputed, printed V)."""
    lhs, rhs = line.split(" = ", 1)[1].rsplit(" = ", 1)
    bias = float(re.search(r"bias\((-?\d+)\)", lhs).group(1))
    total = sum(float(a) * float(b) for a, b in PRODUCT.findall(lhs)) + bias
    return total, float(rhs.split()[0])


# --- conv --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    {},
    dict(stride=2, padding=1),
    dict(input_size=7, kernel=5, padding=2, activation="sigmoid", at="0,4"),
    dict(input_size=6, kernel=2, stride=3, activation="identity", seed=3),
])
def test_conv_spelled_sum_equals_conv2d(opts):
    e = build_explanation("conv", **opts)
    d = e.data
    x, w, b = d["input"][None, None], d["weight"][None, None], d["bias"]
    stride, padding = opts.get("stride", 1), opts.get("padding", 0)
    ref_pre = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=padding)[0, 0]
    act = {"relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}[opts.get("activation", "relu")]
    assert torch.equal(d["pre_activation"].double(), ref_pre)
    torch.testing.assert_close(d["output"].double(), act(ref_pre), rtol=1e-6, atol=1e-6)
    i, j = d["position"]
    if "at" in opts:
        assert (i, j) == tuple(int(v) for v in opts["at"].split(","))
    # the window spelled out is the one conv2d multiplies at (i, j)
    k = w.shape[-1]
    xp = F.pad(x, (padding,) * 4)[0, 0]
    window = xp[stride * i:stride * i + k, stride * j:stride * j + k]
    assert d["pixels"] == window.flatten().tolist() and d["weights"] == w.flatten().tolist()
    assert d["spelled_sum"] == float(ref_pre[i, j])
    # the printed sum, recomputed from its printed products, is conv2d's value there
    line = spelled_line(e.text(), f"out[{i}, {j}] = ")
    recomputed, printed = evaluate_spelled_sum(line)
    assert recomputed == printed == float(ref_pre[i, j])
    if opts.get("activation", "relu") != "identity":
        assert abs(float(line.rsplit(" ", 1)[1]) - float(act(ref_pre)[i, j])) < 0.006
    # what is drawn: the last panel is the output grid; the input panel highlights that window
    torch.testing.assert_close(e.rows[0][-1].values, act(ref_pre), rtol=1e-6, atol=1e-6)
    first = e.rows[0][0]
    assert torch.equal(first.values, xp.double())
    assert first.highlight.sum() == k * k and bool(first.highlight[stride * i:stride * i + k,
                                                                   stride * j:stride * j + k].all())
    assert f"= {ref_pre.shape[-1]}" in spelled_line(e.text(), "output size")


def test_text_shows_every_panel_grid():
    for topic in ("conv", "pool", "upsample", "conv-transpose", "conv1x1"):
        e = build_explanation(topic)
        lines = [" ".join(re.sub(r"[\[\]()]", " ", ln).split()) for ln in e.text().splitlines()]
        for panel in e.panels:
            assert any(panel.title in ln for ln in e.text().splitlines()), panel.title
            rows, cols = panel.values.shape
            for r in range(rows):
                row = " ".join(panel.cell_text(r, c) for c in range(cols))
                assert any(row in ln for ln in lines), (topic, panel.title, row)


# --- pool --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(input_size=7, kernel=3, stride=2, padding=1, at="0,0"),
                                  dict(input_size=5, kernel=2, stride=1, seed=5)])
def test_pool_panels_equal_torch(opts):
    e = build_explanation("pool", **opts)
    d = e.data
    k = opts.get("kernel", 2)
    s, p = opts.get("stride", k), opts.get("padding", 0)
    x = d["input"][None, None]
    mx, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    mean = F.avg_pool2d(x, k, s, p)
    assert torch.equal(d["subsample"], x[0, 0, ::s, ::s])
    assert torch.equal(d["max"], mx[0, 0]) and torch.equal(d["indices"], idx[0, 0])
    torch.testing.assert_close(d["mean"], mean[0, 0])
    titles = [pn.title for pn in e.rows[0]]
    assert torch.equal(e.rows[0][titles.index(f"subsample, stride {s}")].values, x[0, 0, ::s, ::s].double())
    assert torch.equal(e.rows[0][titles.index(f"max pool {k}x{k}, stride {s}")].values, mx[0, 0].double())
    torch.testing.assert_close(e.rows[0][titles.index(f"mean pool {k}x{k}, stride {s}")].values,
                               mean[0, 0].double())
    # the maxima marked on the input are exactly where the pool's indices point
    assert set(e.rows[0][0].highlight.flatten().nonzero().flatten().tolist()) == set(idx.flatten().tolist())
    i, j = d["position"]
    text = e.text()
    assert spelled_line(text, "  max pool:").split(" = ")[1].split()[0] == f"{float(mx[0, 0, i, j]):.0f}"
    printed_mean = float(spelled_line(text, "  mean pool:").rsplit(" = ", 1)[1])
    assert abs(printed_mean - float(mean[0, 0, i, j])) < 0.006


# --- upsample ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(input_size=2, stride=3, seed=1), dict(input_size=4, seed=2)])
def test_upsample_panels_equal_torch(opts):
    e = build_explanation("upsample", **opts)
    d = e.data
    f = opts.get("stride", 2)
    pooled, idx = F.max_pool2d(d["image"][None, None], f, return_indices=True)
    assert torch.equal(d["input"], pooled[0, 0]) and torch.equal(d["indices"], idx[0, 0])
    near = F.interpolate(pooled, scale_factor=f, mode="nearest")
    unpool = F.max_unpool2d(pooled, idx, f)
    bil = F.interpolate(pooled, scale_factor=f, mode="bilinear", align_corners=False)
    assert torch.equal(d["nearest"], near[0, 0])
    assert torch.equal(d["unpooled"], unpool[0, 0])
    torch.testing.assert_close(d["bilinear"], bil[0, 0])
    drawn = {pn.title.split(" x")[0]: pn for pn in e.rows[1]}
    assert torch.equal(drawn["nearest"].values, near[0, 0].double())
    assert torch.equal(drawn["max-unpool"].values, unpool[0, 0].double())
    torch.testing.assert_close(drawn["bilinear"].values, bil[0, 0].double(), rtol=1e-6, atol=1e-6)
    # max-unpooling puts each value back where the pool found it: at the pool's indices, zero elsewhere
    flat = d["unpooled"].flatten()
    assert torch.equal(flat[idx.flatten()], pooled.flatten())
    assert set(drawn["max-unpool"].highlight.flatten().nonzero().flatten().tolist()) == set(idx.flatten().tolist())
    assert int((flat != 0).sum()) <= idx.numel()
    oi, oj = d["bilinear_pixel"]
    assert abs(d["bilinear_value"] - float(bil[0, 0, oi, oj])) < 1e-5
    printed = float(spelled_line(e.text(), "bilinear (align_corners=False)").rsplit(" = ", 1)[1])
    assert abs(printed - float(bil[0, 0, oi, oj])) < 0.006


# --- conv-transpose ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, s, p, op", [(2, 3, 2, 1, 0), (2, 3, 2, 1, 1), (3, 2, 1, 0, 0), (2, 4, 3, 2, 2)])
def test_conv_transpose_stamps_sum_to_conv_transpose2d(n, k, s, p, op):
    e = build_explanation("conv-transpose", input_size=n, kernel=k, stride=s, padding=p, output_padding=op)
    d = e.data
    x, w = d["input"][None, None], d["weight"][None, None]
    ref = F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=op)[0, 0]
    size = conv_transpose_output_size(n, k, s, p, op)
    assert d["output_size"] == size == ref.shape[-1]
    assert torch.equal(d["output"], ref)
    assert len(d["stamps"]) == n * n
    for (i, j), stamp in d["stamps"].items():
        # each stamp is the uncropped transposed convolution of that one pixel alone
        alone = torch.zeros_like(x)
        alone[0, 0, i, j] = x[0, 0, i, j]
        full = F.conv_transpose2d(alone, w, stride=s, output_padding=op)[0, 0]
        assert torch.equal(stamp, full)
    total = sum(d["stamps"].values())
    assert torch.equal(d["full"], total)
    assert torch.equal(total[p:p + size, p:p + size], ref)  # padding crops p from each side
    # drawn: one panel per input pixel, then the sum with the cropped border dimmed, then the output
    assert [len(r) for r in e.rows] == [2, *([n] * n), 2]
    summed, out = e.rows[-1]
    assert torch.equal(out.values, ref.double()) and torch.equal(summed.values, total.double())
    kept = ~summed.dim
    assert int(kept.sum()) == size * size and bool(kept[p:p + size, p:p + size].all())
    assert f"= {size}" in spelled_line(e.text(), "output size")


def test_conv_transpose_chapter_example_sizes():
    # 3x3, stride 2, padding 1: 2x2 -> 3x3, and 4x4 with output_padding 1 (the chapter's figure)
    assert build_explanation("conv-transpose").data["output"].shape == (3, 3)
    assert build_explanation("conv-transpose", output_padding=1).data["output"].shape == (4, 4)


# --- conv1x1 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(in_channels=4, out_channels=3, input_size=2, at="1,0", seed=7)])
def test_conv1x1_equals_linear_per_pixel(opts):
    e = build_explanation("conv1x1", **opts)
    d = e.data
    x, w, b = d["input"], d["weight"], d["bias"]
    ref = F.conv2d(x[None], w[:, :, None, None], b)[0]
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
        per_pixel = linear(x.permute(1, 2, 0)).permute(2, 0, 1)
    assert torch.equal(d["output"], ref)
    torch.testing.assert_close(per_pixel, ref)
    assert all(torch.equal(pn.values, ref[o].double()) for o, pn in enumerate(e.rows[-1]))
    assert len(e.rows[-1]) == w.shape[0] and len(e.rows[0]) == w.shape[1]
    i, j = d["position"]
    for o in range(w.shape[0]):
        recomputed, printed = evaluate_spelled_sum(spelled_line(e.text(), f"out[{o}, {i}, {j}] = "))
        assert recomputed == printed == float(ref[o, i, j]) == d["spelled"][o]


# --- receptive-field ---------------------------------------------------------------------------

def test_vgg16_receptive_fields():
    # By hand, r += (k - 1) * j, j *= s, r = j = 1 at the input; a 3x3 conv adds 2j, a 2x2 stride-2 pool j:
    #   block 1: 1 + 2 + 2 = 5, pool 6 (j 2); block 2: 6 + 4 + 4 = 14, pool 16 (j 4);
    #   block 3: 16 + 3*8 = 40, pool 44 (j 8); block 4: 44 + 3*16 = 92, pool 100 (j 16);
    #   block 5: 100 + 3*32 = 196 at conv5_3 (features.28), pool5 (features.30): 196 + 16 = 212 (j 32).
    e = build_explanation("receptive-field", "vgg16")
    assert e.data["chosen"].name == "features.30"
    assert e.data["chosen"].receptive_field == (212, 212) and e.data["chosen"].total_stride == (32, 32)
    conv53 = build_explanation("receptive-field", "vgg16", layer="features.28").data["chosen"]
    assert conv53.receptive_field == (196, 196) and conv53.total_stride == (16, 16)
    last_row = [ln for ln in e.table.splitlines() if ln.startswith("features.30 ")][0]
    assert last_row.split()[-3:] == ["32", "212", "<-"]
    assert e.data["box"][2:] == (212, 212)


def test_deconvnet_table_sees_its_pools():
    # the switches path used to call F.max_pool2d, hiding the pools from the summary's hooks
    e = build_explanation("receptive-field", "deconvnet", layer="backbone.features.28")
    types = [r.type for r in e.data["rows"]]
    assert types.count("MaxPool2d") == 5
    assert e.data["chosen"].receptive_field == (196, 196) and e.data["chosen"].total_stride == (16, 16)


@pytest.mark.parametrize("name, size", [("alexnet", 127), ("vgg11", 64)])
def test_receptive_field_box_matches_autograd(name, size):
    """The drawn field of the centre unit is where its gradient reaches: all weights 1, no ReLU, and
    max pools replaced by mean pools of the same geometry, so every path carries gradient."""
    model = build_model(name, width=0.05, pool_size=1)
    e = build_explanation("receptive-field", model, input_size=size)
    top, left, rh, rw = e.data["box"]
    layers = []
    for m in model.features:
        if isinstance(m, nn.MaxPool2d):
            m = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        elif isinstance(m, nn.ReLU):
            m = nn.Identity()
        elif isinstance(m, nn.Conv2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        layers.append(m)
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = nn.Sequential(*layers).double()(x)
    assert tuple(out.shape[-2:]) == tuple(e.data["chosen"].output_shape[-2:])
    u, v = e.data["unit"]
    out[0, 0, u, v].backward()
    seen = (x.grad[0, 0] != 0).nonzero()
    rows, cols = seen[:, 0], seen[:, 1]
    assert (int(rows.min()), int(rows.max())) == (max(top, 0), min(top + rh, size) - 1)
    assert (int(cols.min()), int(cols.max())) == (max(left, 0), min(left + rw, size) - 1)
    assert len(seen) == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)


# --- API and CLI -------------------------------------------------------------------------------

def test_explain_writes_only_the_png(tmp_path):
    e = explain("conv1x1", out=tmp_path / "pics")
    assert e.png == tmp_path / "pics" / "conv1x1.png"
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["conv1x1.png"]  # temp file renamed away
    assert e.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, png", [
    (["conv", "--kernel", "3", "--stride", "2", "--padding", "1"], "conv.png"),
    (["pool"], "pool.png"),
    (["upsample"], "upsample.png"),
    (["conv-transpose", "--kernel", "3", "--stride", "2", "--padding", "1", "--input", "2"], "conv-transpose.png"),
    (["conv1x1", "--in-channels", "2"], "conv1x1.png"),
    (["receptive-field", "alexnet"], "receptive-field_alexnet.png"),
])
def test_cli_topics_write_a_png(capsys, tmp_path, argv, png):
    code = main(["explain", *argv, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert f"picture written to {tmp_path / png}" in out


@pytest.mark.parametrize("argv, needle", [
    (["receptive-field", "vgg61"], "vgg16"),
    (["receptive-field"], "model"),
    (["receptive-field", "vgg16", "--layer", "features.99"], "features.99"),
    (["conv", "--stride", "0"], "stride"),
    (["conv", "--kernel", "7"], "padded input"),
    (["conv", "--input", "3", "--kernel", "6", "--padding", "1"], "padded input"),
    (["conv-transpose", "--output-padding", "2"], "output_padding"),
    (["pool", "--activation", "relu"], "--activation"),
    (["conv", "--activation", "swish"], "swish"),
    (["conv", "--at", "9,9"], "outside"),
    (["conv", "vgg16"], "model"),
    (["convolution"], "convolution"),
])
def test_cli_bad_options_one_line_exit_2(capsys, tmp_path, argv, needle):
    code = main(["explain", *argv, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not list(tmp_path.iterdir())


def test_library_errors_are_cnnkit_errors():
    with pytest.raises(CnnkitError):
        build_explanation("pool", padding=2)  # more than half the 2x2 window
