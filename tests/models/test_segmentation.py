"""Segmentation models: DeconvNet, FCN-32s/16s/8s and U-Net (cnnkit.models.segmentation).

Output sizes for odd and even inputs, DeconvNet's unpooling with the encoder's own switches, the
bilinear initialisation of FCN's transposed convolutions against F.interpolate, U-Net's three
upsampling kinds, errors, offline ImageNet weights into U-Net's backbone, a tiny overfit and
`cnnkit info`. Thin widths and small inputs keep the file fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.cli import main
from cnnkit.errors import ModelError, ShapeError
from cnnkit.models import build_model, list_models
from cnnkit.models.backbones import Backbone, build_backbone
from cnnkit.models.segmentation import (FCN, UNet, bilinear_kernel, bilinear_upsampling,
                                        init_bilinear_)

SEGMENT = ("deconvnet", "fcn32s", "fcn16s", "fcn8s", "unet")
# (id, registry name, options): thin, fast variants of every model and upsampling kind
VARIANTS = [
    ("deconvnet", "deconvnet", dict(width=0.125)),
    ("deconvnet-alexnet", "deconvnet", dict(backbone="alexnet", width=0.125)),
    ("fcn32s", "fcn32s", dict(width=0.125)),
    ("fcn16s", "fcn16s", dict(width=0.125)),
    ("fcn8s", "fcn8s", dict(width=0.125)),
    ("fcn8s-full-upsampling", "fcn8s", dict(width=0.125, depthwise_upsampling=False)),
    ("unet-lite0-bilinear", "unet", dict(width=0.25)),
    ("unet-lite0-nearest", "unet", dict(width=0.25, upsample="nearest")),
    ("unet-lite0-transposed", "unet", dict(width=0.25, upsample="transposed")),
    ("unet-vgg11-transposed", "unet", dict(backbone="vgg11", width=0.125, upsample="transposed")),
    ("unet-alexnet-transposed", "unet", dict(backbone="alexnet", width=0.125, upsample="transposed")),
    ("unet-lite0-stride4", "unet", dict(width=0.25, output_stride=4)),
    ("unet-vgg11-stride2", "unet", dict(backbone="vgg11", width=0.125, output_stride=2)),
]
SIZES = [(64, 64), (65, 65), (97, 80)]
_BUILT: dict[str, nn.Module] = {}


def built(variant_id: str) -> nn.Module:
    """One eval-mode model per variant, built once for the whole file."""
    if variant_id not in _BUILT:
        _, name, options = next(v for v in VARIANTS if v[0] == variant_id)
        torch.manual_seed(0)
        _BUILT[variant_id] = build_model(name, num_classes=5, **options).eval()
    return _BUILT[variant_id]


def test_registered_with_task_segment():
    assert set(SEGMENT) <= set(list_models(task="segment"))


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_logits_have_the_input_size(variant):
    model = built(variant)
    smallest = model.min_input_size
    assert isinstance(model.backbone, Backbone) and model.backbone_name
    assert model.num_classes == 5 and model.img_size == 224
    with torch.no_grad():
        for h, w in SIZES + [(smallest, smallest + 1)]:
            assert model(torch.randn(2, 3, h, w)).shape == (2, 5, h, w), (h, w)


@pytest.mark.parametrize("variant", ["deconvnet", "fcn8s", "unet-lite0-bilinear", "unet-alexnet-transposed"])
def test_input_below_min_size_is_a_shape_error(variant):
    model = built(variant)
    small = model.min_input_size - 1
    with pytest.raises(ShapeError, match=f"at least {model.min_input_size}x{model.min_input_size}"):
        model(torch.randn(1, 3, small, 100))
    with pytest.raises(ShapeError, match="input channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ShapeError, match="N, C, H, W"):
        model(torch.randn(3, 64, 64))


def test_options_are_checked():
    with pytest.raises(ModelError, match="transposed, nearest, bilinear"):
        build_model("unet", upsample="bicubic")
    with pytest.raises(ModelError, match="VGG"):
        build_model("fcn8s", backbone="alexnet", width=0.125)
    with pytest.raises(ModelError, match="VGG or AlexNet"):
        build_model("deconvnet", backbone="tv_resnet18")
    with pytest.raises(ShapeError, match="img_size"):
        build_model("fcn32s", width=0.125, img_size=16)
    with pytest.raises(ModelError, match="width"):
        build_model("unet", backbone="vgg11", width=0)
    with pytest.raises(ModelError, match="no width option"):
        build_backbone("resnet18", width=0.5)


def test_width_reaches_the_cnnkit_backbones_only():
    thin = build_backbone("vgg16", width=0.25, out_indices=(4,))
    assert thin.channels == (128,)
    model = built("unet-lite0-bilinear")  # width 0.25: the decoder is thin, the timm encoder is not
    assert model.backbone.channels[-1] == 320
    assert model.decoder_channels == (64, 32, 16, 8, 4)


# --- DeconvNet ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["deconvnet", "deconvnet-alexnet"])
def test_deconvnet_unpools_with_the_encoders_own_switches(variant, monkeypatch):
    model = built(variant)
    encoded = {}
    encoder_forward = model.backbone.forward

    def spy_encoder(x):
        encoded["out"] = encoder_forward(x)
        return encoded["out"]

    calls = []
    unpool = F.max_unpool2d

    def spy_unpool(x, indices, *args, **kwargs):
        calls.append((indices, kwargs.get("output_size", args[3] if len(args) > 3 else None)))
        return unpool(x, indices, *args, **kwargs)

    monkeypatch.setattr(model.backbone, "forward", spy_encoder)
    monkeypatch.setattr(F, "max_unpool2d", spy_unpool)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 97, 80))
    features, pools = encoded["out"]
    assert out.shape == (1, 5, 97, 80)
    assert len(pools) == len(calls) == len(model.unpool) == (5 if variant == "deconvnet" else 3)
    for (indices, size), pool in zip(calls, reversed(pools)):  # the deepest pool is undone first
        assert indices is pool.indices
        assert tuple(size) == tuple(pool.input_size)


def test_deconvnet_mirrors_the_encoder():
    model = built("deconvnet")  # VGG-16 at width 1/8: stages 8-16-32-64-64 channels
    convs = [m for m in model.backbone.features if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in model.deconv.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == len(convs) == 13
    for conv, deconv in zip(reversed(convs[1:]), deconvs[:-1]):
        assert (deconv.in_channels, deconv.out_channels) == (conv.out_channels, conv.in_channels)
        assert deconv.kernel_size == (3, 3) and deconv.stride == (1, 1) and deconv.padding == (1, 1)
    assert (deconvs[-1].in_channels, deconvs[-1].out_channels) == (8, 8)  # deconv1-2 keeps 64 / 8
    assert model.fc[0].kernel_size == (7, 7) and model.fc[0].out_channels == 512  # 4096 / 8
    assert model.fc_deconv.conv.kernel_size == (7, 7)


# --- FCN: bilinear upsampling ------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("depthwise", [True, False])
def test_bilinear_upsampling_equals_interpolate_inside_the_border(factor, depthwise):
    up = bilinear_upsampling(3, factor, depthwise=depthwise)
    assert up.weight.requires_grad and up.bias is None and up.stride == (factor, factor)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        y = up(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert y.shape == ref.shape == (2, 3, 7 * factor, 6 * factor)
    # exact where the source coordinate (o + 0.5) / f - 0.5 lies in [0, n - 1] on both axes
    lo = factor // 2
    rows, cols = slice(lo, 7 * factor - lo), slice(lo, 6 * factor - lo)
    torch.testing.assert_close(y[..., rows, cols], ref[..., rows, cols], rtol=0, atol=1e-5)
    if factor > 1:  # and nowhere else: F.interpolate repeats the edge, the convolution sees zeros
        assert not torch.allclose(y[..., lo - 1, :], ref[..., lo - 1, :])
        assert not torch.allclose(y[..., :, 6 * factor - lo], ref[..., :, 6 * factor - lo])


def test_bilinear_kernel_values_and_reset():
    k = bilinear_kernel(1, 2)[0, 0]
    tent = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(k, torch.outer(tent, tent))
    full = bilinear_kernel(3, 2, depthwise=False)
    assert full.shape == (3, 3, 4, 4) and full[0, 1].abs().sum() == 0 and torch.equal(full[2, 2], k)
    up = bilinear_upsampling(4, 8)
    with torch.no_grad():
        up.weight.mul_(3)
    torch.testing.assert_close(init_bilinear_(up).weight, bilinear_kernel(4, 8))


def test_fcn_initialisation_follows_the_paper():
    for variant, factor in (("fcn32s", 32), ("fcn16s", 16), ("fcn8s", 8)):
        model: FCN = built(variant)
        torch.testing.assert_close(model.upscore.weight, bilinear_kernel(5, factor))
        assert model.upscore.weight.requires_grad
        for name in ("score_fr", "score_pool4", "score_pool3"):
            layer = getattr(model, name, None)
            assert (layer is None) == (name == "score_pool4" and factor == 32 or name == "score_pool3" and factor > 8)
            if layer is not None:
                assert layer.weight.abs().sum() == 0
    fcn8 = built("fcn8s")
    assert fcn8.score_pool4.in_channels == 64 and fcn8.score_pool3.in_channels == 32  # pool4, pool3
    torch.testing.assert_close(fcn8.upscore2.weight, bilinear_kernel(5, 2))


def test_fcn_fuses_the_skips_at_their_own_size():
    """With score_fr set to a constant, the fused upsampled scores are that constant away from the
    border: each skip is zero at init, and bilinear upsampling keeps constants inside the border."""
    model: FCN = build_model("fcn8s", num_classes=2, width=0.125).eval()
    with torch.no_grad():
        model.score_fr.bias.copy_(torch.tensor([1.0, -2.0]))
        out = model(torch.randn(1, 3, 161, 194))  # stride-32 scores: 5 x 6 cells (160 x 192 pixels)
    assert out.shape == (1, 2, 161, 194)
    # the border: one coarse pixel of each of the three upsamplings, 16 + 8 + 4 image pixels
    inside = out[0, :, 28:160 - 28, 28:192 - 28]
    torch.testing.assert_close(inside, torch.tensor([1.0, -2.0])[:, None, None].expand_as(inside))
    assert not torch.allclose(out[0, 0, 0], torch.ones(194))


# --- U-Net -------------------------------------------------------------------------------------------

def test_unet_blocks_and_upsampling_kinds():
    for variant, kind in (("unet-lite0-bilinear", "bilinear"), ("unet-lite0-nearest", "nearest"),
                          ("unet-lite0-transposed", "transposed")):
        model: UNet = built(variant)
        assert model.upsample == kind and len(model.decoder) == 5  # strides 32 -> 16 -> 8 -> 4 -> 2 -> 1
        ups = [block.up for block in model.decoder]
        if kind == "transposed":
            assert all(isinstance(u, nn.ConvTranspose2d) and u.stride == (2, 2) for u in ups)
        else:
            assert all(getattr(u, "mode", None) == kind for u in ups)
    assert len(built("unet-alexnet-transposed").decoder) == 4  # AlexNet: strides 4 .. 32
    assert built("unet-alexnet-transposed").decoder[-1].up.stride == (4, 4)


def test_unet_output_stride_stops_the_decoder_and_upsamples_the_scores():
    full, coarse = built("unet-lite0-bilinear"), built("unet-lite0-stride4")
    assert len(coarse.decoder) == 3  # strides 32 -> 16 -> 8 -> 4, then the scores x4 bilinear
    assert coarse.head.in_channels == coarse.decoder_channels[-1] == full.decoder_channels[2]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        maps = coarse.backbone(x)[coarse.first_level:]
        y = maps[-1]
        for i, block in enumerate(coarse.decoder):
            y = block(y, maps[len(maps) - 2 - i])
        scores = coarse.head(y)
        assert scores.shape[-2:] == (24, 24)
        torch.testing.assert_close(coarse(x), F.interpolate(scores, size=(96, 96), mode="bilinear"))
    assert len(built("unet-vgg11-stride2").decoder) == 4
    with pytest.raises(ModelError, match="output_stride"):
        build_model("unet", num_classes=3, output_stride=8)
    with pytest.raises(ModelError, match="no stride-2 map"):
        build_model("unet", backbone="alexnet", num_classes=3, width=0.125, output_stride=2)


def test_unet_loads_imagenet_weights_into_its_backbone_offline(offline_caches):
    torch.manual_seed(0)
    plain = build_model("unet", backbone="efficientnet_lite0", num_classes=5, width=0.25)
    lines = []
    torch.manual_seed(0)
    model = build_model("unet", backbone="efficientnet_lite0", num_classes=5, width=0.25,
                        weights="imagenet", log=lines.append)
    assert len(lines) == 1 and "efficientnet_lite0" in lines[0] and "transferred" in lines[0]
    assert model.cnnkit_preprocess["mean"] == [0.5, 0.5, 0.5]
    assert not torch.equal(model.backbone.body.conv_stem.weight, plain.backbone.body.conv_stem.weight)
    reference = build_model("efficientnet_lite0", weights="imagenet", log=None)
    torch.testing.assert_close(model.backbone.body.conv_stem.weight, reference.conv_stem.weight)
    for name, tensor in plain.state_dict().items():  # the decoder and the head keep their init
        if not name.startswith("backbone."):
            torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)


# --- training and the CLI ----------------------------------------------------------------------------

def _two_scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64x64 images: a red square (class 1) and a blue disc (class 2) on dark noise (class 0)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 0.2
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for n, (cy, cx) in enumerate([(20, 24), (40, 36)]):
        square = ((yy - cy).abs() < 10) & ((xx - cx).abs() < 10)
        disc = (yy - (63 - cy)) ** 2 + (xx - (63 - cx)) ** 2 < 100
        masks[n][square], masks[n][disc] = 1, 2
        images[n, 0][square] += 0.8
        images[n, 2][disc] += 0.8
    return images, masks


def test_unet_overfits_two_images():
    images, masks = _two_scenes()
    torch.manual_seed(0)
    model = build_model("unet", backbone="vgg11", num_classes=3, width=0.25, decoder_channels=(64, 32, 32, 32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == masks).float().mean().item()
    assert accuracy > 0.95  # background alone is 0.84


@pytest.mark.parametrize("name", SEGMENT)
def test_cnnkit_info_shows_parameters_and_macs(name, capsys):
    code = main(["info", name, "--input", "3x65x80", "--width", "0.125", "--num-classes", "21"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"{name}, input 3 x 65 x 80")
    assert "total parameters" in out and "multiply-adds (MACs)" in out
    assert "21 x 65 x 80" in out  # the logits at the input's size
    assert main(["info", name, "--input", "3x31x80", "--width", "0.125"]) == 2
    assert "at least 32x32" in capsys.readouterr().err


def test_classifier_weight_file_goes_to_the_backbone_and_own_file_to_the_model(tmp_path):
    torch.manual_seed(0)
    clf = build_model("vgg11", num_classes=10, width=0.25, pool_size=1)
    torch.save(clf.state_dict(), tmp_path / "vgg11.pth")
    lines = []
    net = build_model("unet", backbone="vgg11", width=0.25, num_classes=3, weights=str(tmp_path / "vgg11.pth"),
                      log=lines.append)
    assert torch.equal(net.backbone.features[0].weight, clf.features[0].weight)
    assert "vgg11" in lines[0] and "classifier" in lines[0]
    torch.save(net.state_dict(), tmp_path / "unet.pth")
    twin = build_model("unet", backbone="vgg11", width=0.25, num_classes=3, weights=str(tmp_path / "unet.pth"),
                       log=lines.append)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), net.state_dict().values()))
