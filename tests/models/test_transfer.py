"""Transfer learning, model side: ImageNet backbones as classifiers and feature extractors, weight
specs (offline EfficientNet-Lite0, torchvision names, files), head surgery and safe loading.
No network: torchvision's cache is a temporary TORCH_HOME and downloads are refused or faked."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import cnnkit
from cnnkit.data.images import decode_image
from cnnkit.errors import ModelError, WeightsError
from cnnkit.models import build_model
from cnnkit.models.backbones import (backbone_feature_info, backbone_parameters, build_backbone,
                                     head_parameters, list_backbones)
from cnnkit.models.weights import adapt_input_conv, format_weights_table, weights_table

PHOTOS = Path(cnnkit.__file__).parent / "assets" / "photos"
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


pytestmark = pytest.mark.usefixtures("offline_caches")  # every test here (tests/models/conftest.py)


@pytest.fixture(scope="module")
def lite0():
    return build_model("efficientnet_lite0", weights="imagenet", log=None).eval()


def prepare(path: Path, pre: dict) -> torch.Tensor:
    img = decode_image(path)
    img = TF.resize(img, 256, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, pre["img_size"])
    x = img.float() / 255
    mean = torch.tensor(pre["mean"]).view(-1, 1, 1)
    std = torch.tensor(pre["std"]).view(-1, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


# --- offline ImageNet weights -------------------------------------------------------------------

def test_lite0_imagenet_classifies_the_shipped_photos(lite0):
    pre = lite0.cnnkit_preprocess
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and pre["img_size"] == 224
    assert len(lite0.cnnkit_categories) == 1000 and lite0.cnnkit_categories[ESPRESSO] == "espresso"
    with torch.no_grad():
        coffee = lite0(prepare(PHOTOS / "coffee.jpg", pre))[0]
        cat = lite0(prepare(PHOTOS / "chelsea.jpg", pre))[0]
    assert int(coffee.argmax()) == ESPRESSO
    assert set(cat.topk(3).indices.tolist()) & set(CATS)
    for photo in ("astronaut.jpg", "rocket.jpg"):
        assert decode_image(PHOTOS / photo).shape[0] == 3


def test_head_surgery_keeps_trunk_and_reports_classifier(lite0):
    lines: list[str] = []
    model = build_model("efficientnet_lite0", num_classes=10, weights="imagenet", log=lines.append)
    report = model.cnnkit_weights_report
    assert report.total == 247 and report.transferred == 245
    assert report.skipped == ["classifier.weight", "classifier.bias"]
    assert len(lines) == 1 and "245/247" in lines[0] and "classifier.weight" in lines[0]
    assert model.cnnkit_kwargs == {"num_classes": 10}  # a checkpoint rebuilds the architecture only
    assert not hasattr(model, "cnnkit_categories")
    torch.testing.assert_close(model.conv_stem.weight, lite0.conv_stem.weight)
    assert model.get_classifier().out_features == 10


def test_in_channels_1_with_imagenet_weights_sums_the_first_conv(lite0):
    grey = build_model("efficientnet_lite0", in_channels=1, weights="imagenet", log=None).eval()
    assert grey.in_channels == 1 and grey.conv_stem.weight.shape[1] == 1
    assert grey.cnnkit_preprocess["mean"] == [0.5] and grey.cnnkit_weights_report.adapted == ["conv_stem.weight"]
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(grey(x), lite0(x.expand(-1, 3, -1, -1)), atol=2e-4, rtol=1e-4)


def test_vgg_in_channels_1_from_an_rgb_file(tmp_path):
    rgb = build_model("vgg11", width=0.125, pool_size=1, num_classes=4).eval()
    torch.save(rgb.state_dict(), tmp_path / "vgg.pth")
    grey = build_model("vgg11", width=0.125, pool_size=1, num_classes=4, in_channels=1,
                       weights=tmp_path / "vgg.pth", log=None).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)


def test_adapt_input_conv_repeats_for_more_channels():
    w = torch.randn(8, 3, 3, 3)
    five = adapt_input_conv(w, 5)
    assert five.shape == (8, 5, 3, 3)
    torch.testing.assert_close(five[:, 3], w[:, 0] * 3 / 5)
    x = torch.rand(1, 1, 6, 6)  # with a multiple of 3 channels, a grey image gives what RGB gave
    torch.testing.assert_close(F.conv2d(x.expand(-1, 6, -1, -1), adapt_input_conv(w, 6)),
                               F.conv2d(x.expand(-1, 3, -1, -1), w))


# --- files ---------------------------------------------------------------------------------------

def test_cnnkit_checkpoint_and_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    src = build_model("tv_resnet18", num_classes=3)
    names = ["a", "b", "c"]
    torch.save({"state_dict": src.state_dict(), "names": names, "preprocess": {"mean": [0.1] * 3, "std": [0.2] * 3,
                                                                               "img_size": 96}}, tmp_path / "best.pt")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "best.pt", tmp_path / "w.safetensors"):
        model = build_model("tv_resnet18", num_classes=3, weights=str(path), log=None)
        report = model.cnnkit_weights_report
        assert report.transferred == report.total and not report.skipped
        torch.testing.assert_close(model.fc.weight, src.fc.weight)
    model = build_model("tv_resnet18", num_classes=3, weights=tmp_path / "best.pt", log=None)
    assert model.cnnkit_categories == names and model.cnnkit_preprocess["img_size"] == 96


def test_checkpoint_of_another_architecture_lists_the_keys(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(build_model("tv_mobilenet_v3_large").state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_model("efficientnet_lite0", weights=path, log=None)
    text = str(err.value)
    assert str(path) in text and "do not fit efficientnet_lite0" in text
    assert "missing" in text and "conv_stem.weight" in text and "more" in text
    assert "features.0.0.weight" in text and "\n" not in text


def test_crafted_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps(Evil(), protocol=2))
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, zipped)
    for path in (raw, zipped):
        with pytest.raises(WeightsError, match="refused") as err:
            build_model("vgg11", width=0.125, pool_size=1, weights=path, log=None)
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_truncated_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    state = build_model("vgg11", width=0.125, pool_size=1).state_dict()
    torch.save(state, tmp_path / "full.pth")
    save_file(state, str(tmp_path / "full.safetensors"))
    for name in ("full.pth", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError) as err:
            build_model("vgg11", width=0.125, pool_size=1, weights=cut, log=None)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        build_model("vgg11", width=0.125, pool_size=1, weights=tmp_path / "nope.pt", log=None)


# --- torchvision weight names and downloads ------------------------------------------------------

def test_unknown_torchvision_weight_name_suggests(tmp_path):
    with pytest.raises(WeightsError, match=r"VGG11_Weights\.IMAGENET1K_V1"):
        build_model("vgg11", width=0.125, pool_size=1, weights="VGG11_Weights.IMAGENET1K_V2", log=None)
    with pytest.raises(WeightsError, match="imagenet"):
        build_model("vgg11", width=0.125, pool_size=1, weights="imagenett", log=None)
    with pytest.raises(WeightsError, match="resnet18"):
        build_model("vgg11", width=0.125, pool_size=1, weights="ResNet18_Weights.IMAGENET1K_V1", log=None)


def test_uncached_weights_need_download_flag():
    with pytest.raises(WeightsError, match="--download") as err:
        build_model("vgg11", width=0.125, pool_size=1, weights="VGG11_Weights.IMAGENET1K_V1", log=None)
    assert "vgg11-8a719046.pth" in str(err.value)
    for name in ("tv_resnet18", "resnet18"):  # torchvision's and timm's
        with pytest.raises(WeightsError, match="--download") as err:
            build_model(name, weights="imagenet", log=None)
        assert "efficientnet_lite0" in str(err.value)


def test_download_while_offline_is_one_line(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsError, match="cannot download") as err:
        build_model("tv_mobilenet_v3_large", weights="DEFAULT", download=True, log=None)
    assert "\n" not in str(err.value)


def test_cached_torchvision_weights_load_offline(tmp_path):
    import torchvision

    weights = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = torchvision.models.mobilenet_v3_large()
    torch.save(reference.state_dict(), cache / Path(weights.url).name)
    row = next(r for r in weights_table() if r["weights"] == "MobileNet_V3_Large_Weights.IMAGENET1K_V2")
    assert row["offline"] and row["backbone"] == "tv_mobilenet_v3_large"

    full = build_model("tv_mobilenet_v3_large", weights="MobileNet_V3_Large_Weights.DEFAULT", log=None).eval()
    assert len(full.cnnkit_categories) == 1000 and full.cnnkit_preprocess["img_size"] == 224
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(full(x), reference.eval()(x))
    five = build_model("tv_mobilenet_v3_large", num_classes=5, weights="imagenet", log=None)
    assert five.cnnkit_weights_report.skipped == ["classifier.3.weight", "classifier.3.bias"]


def test_weights_table_lists_every_backbone():
    rows = weights_table()
    assert {r["backbone"] for r in rows} == set(list_backbones())
    lite = next(r for r in rows if r["backbone"] == "efficientnet_lite0")
    assert lite["weights"] == "imagenet" and lite["offline"]
    assert not next(r for r in rows if r["backbone"] == "vgg16" and r["weights"] == "imagenet")["offline"]
    text = format_weights_table(rows)
    assert "VGG16_Weights.IMAGENET1K_V1" in text and "offline" in text and "download" in text


# --- classifiers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv3_large_100", "tv_resnet18",
                                  "tv_mobilenet_v3_large"])
def test_classifier_interface(name):
    model = build_model(name, num_classes=3, in_channels=1).eval()
    assert model.in_channels == 1 and model.min_input_size == 32
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert model.forward_features(x).shape[:2] == (2, model.num_features)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    head, body = head_parameters(model), backbone_parameters(model)
    assert {id(p) for p in head}.isdisjoint({id(p) for p in body})
    assert len(head) + len(body) == len(list(model.parameters()))
    assert {id(p) for p in head_parameters(model, last_layer_only=True)} <= {id(p) for p in head}


def test_head_is_what_forward_head_runs():
    lite = build_model("efficientnet_lite0", num_classes=3)
    assert [p.shape for p in head_parameters(lite)] == [(3, 1280), (3,)]
    mnv3 = build_model("mobilenetv3_large_100", num_classes=3)
    assert {id(p) for p in head_parameters(mnv3)} == {id(p) for p in [*mnv3.conv_head.parameters(),
                                                                      *mnv3.classifier.parameters()]}
    vgg = build_model("vgg11", width=0.125, pool_size=1, num_classes=3)
    assert {id(p) for p in head_parameters(vgg)} == {id(p) for p in vgg.classifier.parameters()}
    assert backbone_parameters(vgg) == list(vgg.features.parameters())
    assert head_parameters(build_backbone("tv_resnet18")) == []


# --- feature extractors --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_backbones())
def test_feature_info_matches_outputs(name):
    backbone = build_backbone(name).eval()
    info = backbone.feature_info
    assert info == backbone_feature_info(name) and info.strides == (4, 8, 16, 32)
    with torch.no_grad():
        small, large = backbone(torch.rand(1, 3, 64, 64)), backbone(torch.rand(1, 3, 96, 96))
    assert [f.shape[1] for f in small] == list(info.channels) == list(backbone.channels)
    for a, b, stride in zip(small, large, info.strides):
        # 32 more input pixels give 32 / stride more output pixels, whatever the padding
        assert (b.shape[-2] - a.shape[-2]) * stride == 32 and (b.shape[-1] - a.shape[-1]) * stride == 32


def test_out_indices_and_errors():
    b = build_backbone("tv_resnet18", out_indices=(0, 2))
    assert b.feature_info.strides == (2, 8) and b.feature_info.channels == (64, 128)
    assert not hasattr(b, "layer3")  # cut after the last level needed
    assert [f.shape[1] for f in b(torch.rand(1, 3, 64, 64))] == [64, 128]
    with pytest.raises(ModelError, match="stride"):
        build_backbone("alexnet", out_indices=(0,))  # its first convolution has stride 4
    with pytest.raises(ModelError, match="did you mean"):
        build_backbone("resnet17")
    with pytest.raises(ModelError, match="return_indices"):
        build_backbone("resnet18", return_indices=True)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv3_large_100"])
def test_timm_blocks_after_the_deepest_map_read_are_left_out(name):
    """timm's EfficientNet / MobileNetV3 extractors would run every block; the maps asked for stay
    the same when the blocks after the deepest one are not built."""
    torch.manual_seed(0)
    whole = build_backbone(name).eval()  # levels 1-4: every block
    for indices, kept in (((1, 2), 3), ((3,), 5), ((4,), 7)):
        part = build_backbone(name, out_indices=indices).eval()
        assert len(part.body.blocks) == kept
        part.load_state_dict({k: v for k, v in whole.state_dict().items() if k in part.state_dict()})
        x = torch.rand(1, 3, 96, 96)
        with torch.no_grad():
            every, some = whole(x), part(x)
        for level, got in zip(indices, some):
            torch.testing.assert_close(got, every[level - 1], rtol=0, atol=0)


def test_vgg_return_indices_drive_max_unpool():
    backbone = build_backbone("vgg11", out_indices=(0, 1, 2, 3, 4), return_indices=True).eval()
    x = torch.rand(1, 3, 70, 70)  # odd sizes on the way down: 70, 35, 17, 8, 4, 2
    with torch.no_grad():
        features, pools = backbone(x)
    assert len(pools) == 5 and [p.input_size for p in pools] == [(70, 70), (35, 35), (17, 17), (8, 8), (4, 4)]
    before, after, pool = features[3], features[4], pools[4]  # pre-pool5 map, pool5 output
    up = F.max_unpool2d(after, pool.indices, 2, 2, output_size=pool.input_size)
    assert up.shape == before.shape
    # every pooled value returns to the position of its maximum; everything else is 0
    torch.testing.assert_close(before.flatten(2).gather(2, pool.indices.flatten(2)), after.flatten(2))
    torch.testing.assert_close(F.max_pool2d(up, 2, 2), after)
    assert int((up != 0).sum()) <= after.numel()


def test_backbone_with_imagenet_weights(lite0, tmp_path):
    lines: list[str] = []
    backbone = build_backbone("efficientnet_lite0", weights="imagenet", log=lines.append)
    torch.testing.assert_close(backbone.body.conv_stem.weight, lite0.conv_stem.weight)
    assert backbone.cnnkit_weights_report.unused and len(lines) == 1
    assert backbone.cnnkit_preprocess["std"] == [0.5] * 3
    torch.save(build_model("vgg11", width=0.125, pool_size=1).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(WeightsError, match="other shapes"):  # width 0.125 is not VGG-11's width
        build_backbone("vgg11", weights=tmp_path / "narrow.pth", log=None)
