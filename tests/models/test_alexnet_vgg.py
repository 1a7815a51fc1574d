"""AlexNet and VGG against torchvision (checkpoints, outputs, parameter counts), their options and
errors, the registry, and the layer summary (parameters, MACs, receptive fields)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from cnnkit.errors import ModelError, ShapeError
from cnnkit.models import AlexNet, VGG, build_model, list_models, model_info, summarize
from cnnkit.models.summary import format_summary, smallest_input_size

ALL = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
# Published parameter counts (torchvision's model cards) for the two the chapter quotes.
KNOWN_PARAMS = {"alexnet": 61_100_840, "vgg16": 138_357_544}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_variant_is_registered():
    assert set(ALL) <= set(list_models())


@pytest.mark.parametrize("name", ALL)
def test_torchvision_checkpoint_loads_and_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    path = tmp_path / f"{name}.pt"
    torch.save(reference.state_dict(), path)

    ours = build_model(name).eval()
    theirs = reference.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.items())
    assert n_params(ours) == n_params(reference) == KNOWN_PARAMS.get(name, n_params(reference))
    ours.load_state_dict(torch.load(path, weights_only=True, mmap=True), strict=True)

    size = 64 if name == "alexnet" else 32  # adaptive pooling: any size above the minimum works
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_base_vgg_class_matches_its_builders():
    assert n_params(VGG("A", width=0.125, pool_size=1)) == n_params(build_model("vgg11", width=0.125,
                                                                                 pool_size=1))
    with pytest.raises(ModelError, match="configuration"):
        VGG("C")


def test_min_input_size_by_hand_and_tight():
    # AlexNet: the last pool needs 3 pixels <- 7 after conv2 <- 15 after conv1 <- (15-1)*4+11-4 = 63.
    # VGG: five 2x2 stride-2 pools need 2^5 = 32.
    assert AlexNet(width=0.05).min_input_size == 63
    assert VGG("A", width=0.05).min_input_size == 32
    for model in (AlexNet(width=0.05), VGG("A", width=0.05)):
        m = model.min_input_size
        model.features(torch.zeros(1, 3, m, m))  # torch itself accepts the minimum ...
        with pytest.raises(RuntimeError):
            model.features(torch.zeros(1, 3, m - 1, m - 1))  # ... and rejects one pixel less


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "vgg13_bn"])
@pytest.mark.parametrize("options", [
    dict(width=0.125, pool_size=1, num_classes=7),
    dict(width=0.1, pool_size=2, in_channels=1, num_classes=3, dropout=0.2),
    dict(width=0.3, pool_size=(1, 2), num_classes=1),
])
def test_options_build_and_run_at_min_size(name, options):
    model = build_model(name, **options)
    assert model.cnnkit_name == name and model.cnnkit_kwargs == options
    m, c = model.min_input_size, options.get("in_channels", 3)
    model.train()
    out = model(torch.randn(2, c, m, m))
    assert out.shape == (2, options["num_classes"])
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, c, m + 13, m + 5)).shape == (1, options["num_classes"])
    with pytest.raises(ShapeError, match=f"at least {m}x{m}"):
        model(torch.randn(1, c, m - 1, m + 10))
    with pytest.raises(ShapeError, match="input channels"):
        model(torch.randn(1, c + 2, m, m))
    with pytest.raises(ShapeError, match="unsqueeze"):
        model(torch.randn(c, m, m))


def test_width_scales_conv_and_fc_widths():
    model = build_model("vgg16", width=0.25, pool_size=1, num_classes=5)
    convs = [layer.out_channels for layer in model.features if isinstance(layer, nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert model.num_features == 128 and model.head_hidden_size == 1024
    fc_inputs = [layer.in_features for layer in model.classifier if isinstance(layer, nn.Linear)]
    assert fc_inputs == [128, 1024, 1024]
    tiny = build_model("alexnet", width=0.001, pool_size=1, num_classes=2)  # every width rounds up to 1
    assert {layer.out_channels for layer in tiny.features if isinstance(layer, nn.Conv2d)} == {1}
    assert tiny(torch.randn(1, 3, 63, 63)).shape == (1, 2)


def test_timm_interface():
    model = build_model("vgg11_bn", width=0.125, pool_size=1, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(9)
    assert model(x).shape == (2, 9) and model.num_classes == 9
    assert model.get_classifier().out_features == 9
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    headless = build_model("alexnet", num_classes=0, width=0.125, pool_size=1)
    assert headless(torch.randn(1, 3, 63, 63)).shape == (1, 512)


@pytest.mark.parametrize("options", [dict(width=0), dict(width=-1.0), dict(dropout=1.5),
                                     dict(num_classes=-1), dict(in_channels=0), dict(pool_size=0),
                                     dict(colour="red")])
def test_bad_options_are_model_errors(options):
    with pytest.raises(ModelError):
        build_model("alexnet", **options)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match="vgg16") as info:
        build_model("vgg61")
    assert "did you mean" in str(info.value)
    assert build_model("VGG11", width=0.05).cnnkit_name == "vgg11"


# --- summary ---------------------------------------------------------------------------------

def test_alexnet_summary_almost_all_parameters_in_fc_layers():
    with torch.device("meta"):
        model = build_model("alexnet")
    s = summarize(model)
    assert s.total_params == s.trainable_params == 61_100_840
    assert s.conv_params + s.fc_params == s.total_params
    assert 0.95 < s.fc_share < 0.97
    assert s.macs == 714_188_480  # torchvision's model card: 0.71 GFLOPS (multiply-adds)
    rows = {r.name: r for r in s.rows}
    assert rows["features.0"].output_shape == (1, 64, 55, 55)
    # by hand: 11 (j=4), pool 11+2*4=19 (j=8), conv 19+4*8=51, pool 67 (j=16),
    # three 3x3 convs 99, 131, 163, pool 163+2*16=195 (j=32)
    assert rows["features.12"].receptive_field == (195, 195)
    assert rows["features.12"].total_stride == (32, 32)
    assert rows["classifier.6"].receptive_field is None


def test_vgg16_summary_params_macs_and_receptive_field():
    with torch.device("meta"):
        model = build_model("vgg16")
    s = summarize(model)
    assert s.total_params == 138_357_544
    assert abs(s.macs - 15.47e9) / 15.47e9 < 0.01
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert s.macs == counter.get_total_flops() // 2
    # By hand, r += (k-1) * j: stage 1: 3, 5, pool 6 (j=2); stage 2: 10, 14, pool 16 (j=4);
    # stage 3: 24, 32, 40, pool 44 (j=8); stage 4: 60, 76, 92, pool 100 (j=16);
    # stage 5: 132, 164, 196, pool 212 (j=32). The last conv sees 196 pixels, the last pool 212.
    rfs = [r.receptive_field[0] for r in s.rows if r.type == "Conv2d"]
    assert rfs == [3, 5, 10, 14, 24, 32, 40, 60, 76, 92, 132, 164, 196]
    last_pool = [r for r in s.rows if r.type == "MaxPool2d"][-1]
    assert last_pool.receptive_field == (212, 212) and last_pool.total_stride == (32, 32)


def test_small_conv_net_macs_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),            # 8x16x16 = 2048 outputs x 3*3*3  = 55,296
        nn.ReLU(),
        nn.MaxPool2d(2),                          # 8x8x8
        nn.Conv2d(8, 16, 3, stride=2, groups=2),  # 16x3x3 = 144 outputs x (8/2)*3*3 = 5,184
        nn.Flatten(),
        nn.Linear(144, 10),                       # 144 * 10 = 1,440
    )
    s = summarize(net, (3, 16, 16))
    assert [r.macs for r in s.rows] == [55_296, 0, 0, 5_184, 0, 1_440]
    assert s.macs == 61_920
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 16, 16))
    assert counter.get_total_flops() == 2 * 61_920
    assert s.rows[3].receptive_field == (3 + 1 + 2 * 2, 3 + 1 + 2 * 2)  # 3, pool 4 (j=2), conv 8
    assert smallest_input_size(net) == 6  # conv2 (3x3, no padding) needs 3 <- the 2x2 pool needs 6
    assert s.total_params == n_params(net) and s.fc_params == 1450


def test_summarize_leaves_real_model_untouched():
    model = build_model("vgg11_bn", width=0.125, pool_size=1, num_classes=3)
    model.train()
    model.features[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summarize(model, (3, 32, 32))
    assert model.training and not model.features[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_info_text_and_errors():
    text = model_info("alexnet")
    assert "61,100,840" in text and "0.71 G" in text and "96.0%" in text
    lines = text.splitlines()
    assert lines[0].startswith("alexnet, input 3 x 224 x 224")
    assert len({len(line) for line in lines[2:4]}) == 1  # header as wide as its rule
    assert "15.47 G" in model_info("vgg16")
    assert "1 x 32 x 32" in model_info("vgg11", 32, in_channels=1, width=0.1, pool_size=1)
    with pytest.raises(ShapeError, match="at least 32x32") as info:
        model_info("vgg16", (3, 31, 31))
    assert "\n" not in str(info.value)
    with pytest.raises(ShapeError, match="at least 63x63"):
        model_info("alexnet", 62)
    with pytest.raises(ModelError, match="vgg16"):
        model_info("vgg61")
    assert format_summary(summarize(nn.Conv2d(1, 1, 1), (1, 4, 4))).count("\n") > 3
