"""BatchNorm folded into the convolution before it (`cnnkit.engine.fold`): the folded weights match torch's
own `fuse_conv_bn_eval`, every registry family gives the same outputs folded and unfolded, a pair that
must not be folded (the convolution's output also used elsewhere, a convolution called twice, BatchNorm
after something else) is left alone, and `cnnkit predict` / `val` fold unless told not to."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cnnkit.engine.fold import REL_TOLERANCE, _largest_change, fold_batchnorm, fold_pair
from cnnkit.models import build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_a_folded_pair_matches_torchs_fuse_conv_bn_eval(transposed, conv_bias):
    torch.manual_seed(1)
    conv = (nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1, bias=conv_bias) if transposed
            else nn.Conv2d(6, 5, 3, padding=1, bias=conv_bias))
    bn = _randomise_bn(nn.Sequential(nn.BatchNorm2d(5)))[0]
    reference = fuse_conv_bn_eval(conv.eval(), bn, transpose=transposed)
    fold_pair(conv, bn)
    torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv.bias, reference.bias, rtol=1e-6, atol=1e-7)


# one member of each family a checkpoint can hold; small widths and sizes keep it fast
FAMILIES = {
    "vgg11_bn": (dict(num_classes=4, in_channels=1, width=0.125, pool_size=1), (2, 1, 32, 32)),
    "yolo/efficientnet_lite0": (dict(num_classes=3, img_size=64, backbone="efficientnet_lite0", width=0.25),
                                (2, 3, 64, 64)),
    "yolo/vgg11 (conv + BN in Sequentials)": (dict(num_classes=3, img_size=64, backbone="vgg11", width=0.125),
                                              (2, 3, 64, 64)),
    "unet/efficientnet_lite0": (dict(num_classes=3, img_size=64, backbone="efficientnet_lite0", width=0.25),
                                (2, 3, 64, 64)),
    "deconvnet (transposed convolutions + BN)": (dict(num_classes=3, img_size=64, width=0.125), (2, 3, 64, 64)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_the_same_outputs_folded(family):
    name = family.split()[0].split("/")[0]
    kwargs, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = _randomise_bn(build_model(name, **kwargs))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    result = fold_batchnorm(model, x[:1])
    assert not result.refused, result.refused
    assert result.batchnorms > 0 and result.folded == result.batchnorms, result.describe()
    assert result.model is not model  # a copy: the model given stays as it was
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == result.batchnorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    with torch.no_grad():
        before, after = model(x), result.model(x)  # another batch than the one the fold was checked on
    assert _largest_change(before, after) < REL_TOLERANCE
    assert _largest_change(before, after) > 0  # the folded copy really computes differently (rounding)


class SharedOutput(nn.Module):
    """conv -> BN, and the conv's output is also added back: folding the BN into the conv would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_whose_output_is_also_used_elsewhere_is_not_folded():
    model = _randomise_bn(SharedOutput())
    x = torch.randn(2, 3, 8, 8)
    result = fold_batchnorm(model, x)
    assert result.model is model and result.folded == 0 and result.batchnorms == 1
    assert "outputs moved by" in result.refused and "not folded" in result.describe()
    assert isinstance(model.bn, nn.BatchNorm2d)  # untouched


class NotAfterAConv(nn.Module):
    """BatchNorm after a pooling layer, and a convolution used twice (its BatchNorms cannot both be folded)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.last = nn.Conv2d(3, 2, 1)
        self.bn3 = nn.BatchNorm2d(2)

    def forward(self, x):
        x = self.bn0(self.pool(x))
        x = self.bn1(self.conv(x))
        x = self.bn2(self.conv(x))
        return self.bn3(self.last(x))


def test_only_a_batchnorm_reading_a_convolution_called_once_is_folded():
    model = _randomise_bn(NotAfterAConv())
    x = torch.randn(2, 3, 16, 16)
    result = fold_batchnorm(model, x)
    assert (result.folded, result.batchnorms) == (1, 4), result.describe()
    assert isinstance(result.model.bn3, nn.Identity)
    assert all(isinstance(getattr(result.model, n), nn.BatchNorm2d) for n in ("bn0", "bn1", "bn2"))
    with torch.no_grad():
        assert _largest_change(model(x), result.model(x)) < REL_TOLERANCE


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).train(), torch.randn(1, 1, 4, 4))


def test_the_check_can_fail():
    """_largest_change is what refuses a wrong fold: it sees a change of one part in 1e3 and a different shape."""
    a = torch.ones(2, 3)
    assert _largest_change(a, a) == 0
    assert _largest_change(a, a + 1e-3) > REL_TOLERANCE
    assert _largest_change((a, {"x": a}), (a, {"x": a * 1.01})) > REL_TOLERANCE
    assert _largest_change(a, a[:1]) == float("inf")


def test_predict_folds_in_fp32_keeps_batchnorm_in_bf16_unless_told(tmp_path, capsys):
    from PIL import Image

    from cnnkit.cli import main
    from cnnkit.engine.checkpoint import save_checkpoint
    from tests.engine.test_export import _checkpoint

    pt = tmp_path / "best.pt"
    save_checkpoint(pt, _checkpoint("segment"))  # unet on vgg11: 10 convolutions + BatchNorm in the decoder
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 60), (120, 30, 200)).save(photo)
    said, masks = {}, {}
    for precision, fold in (("fp32", "auto"), ("fp32", "off"), ("bf16", "auto"), ("bf16", "on")):
        out = tmp_path / f"{precision}-{fold}"
        assert main(["predict", str(photo), "--weights", str(pt), "--device", "cpu", "--precision", precision,
                     "--channels-last", "off", "--out", str(out), "--fold-bn", fold]) == 0
        said[precision, fold] = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("inference on"))
        masks[precision, fold] = sorted(out.rglob("*.png"))
    folded = "; BatchNorm folded into the convolution before it: 10 of 10 layers"
    assert said["fp32", "auto"].endswith(folded) and said["bf16", "on"].endswith(folded)
    assert "BatchNorm" not in said["fp32", "off"]
    assert said["bf16", "auto"].endswith("; BatchNorm kept (with bf16 folded weights round differently; "
                                         "--fold-bn on folds)")
    assert all(masks.values())  # every run wrote its pictures


def test_a_fold_setting_that_is_not_auto_on_or_off_is_one_clear_error():
    from cnnkit.engine.inference import _fold_setting
    from cnnkit.errors import UsageError

    assert (_fold_setting(True), _fold_setting(False), _fold_setting("auto")) == ("on", "off", "auto")
    with pytest.raises(UsageError, match="fold_bn must be one of auto, on, off"):
        _fold_setting("yes")
