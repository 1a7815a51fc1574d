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


def test_frozen_early_layers_train_the_same_with_their_batchnorm_folded():
    """FrozenFold (fp32 training with --freeze-early): the same outputs and gradients as the model as built,
    parameters and buffers untouched, only frozen pairs folded, and undo() gives back the model's own forward."""
    import copy

    from cnnkit.engine.finetune import freeze_early, train_mode
    from cnnkit.engine.fold import FrozenFold

    torch.manual_seed(0)
    model = _randomise_bn(build_model("yolo", num_classes=3, img_size=64, backbone="efficientnet_lite0", width=0.25))
    freeze_early(model, 4)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fold = FrozenFold(model, x[:2], model.cnnkit_early_frozen)
    early = set(model.cnnkit_early_frozen)
    assert len(fold.pairs) >= 3 and all(c in early and b in early for c, b in fold.pairs)
    assert all("forward" in c.__dict__ for c, _ in fold.pairs)
    assert not any("forward" in m.__dict__ for m in model.modules() if m not in early)  # trained layers untouched
    outs = []
    for m in (reference, model):
        train_mode(m)
        out = m(x)
        out.pow(2).mean().backward()
        outs.append(out)
    assert _largest_change(outs[0], outs[1]) < REL_TOLERANCE
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    folded = dict(model.named_parameters())
    for name, p in trained:
        assert _largest_change(p.grad, folded[name].grad) < 1e-3, name
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():  # no parameter of the model changed; BatchNorm statistics
        if k in dict(reference.state_dict()):  # moved alike in both (the trained layers' batch statistics)
            assert _largest_change(reference.state_dict()[k].float(), v.float()) < REL_TOLERANCE, k
    assert all(torch.equal(model.state_dict()[k], before[k]) for c, b in fold.pairs
               for k in before if k.startswith(tuple(n + "." for n, m in model.named_modules() if m in (c, b))))
    fold.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    reference.load_state_dict(model.state_dict())  # the same numbers: after undo, the same computation
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_fit_folds_frozen_batchnorm_in_fp32_only(shapes_dir, tmp_path, monkeypatch):
    from cnnkit.engine import trainer
    from cnnkit.engine.config import TrainConfig

    def cfg(name, **kw):
        base = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                    data=str(shapes_dir), epochs=1, max_steps=4, batch_size=16, img_size=32, lr=0.02, seed=3,
                    precision="fp32", channels_last="off", workers=0, freeze_early=2, project=str(tmp_path),
                    name=name, progress=False, plots=False)
        return TrainConfig(**{**base, **kw})

    logs: dict[str, list[str]] = {"folded": [], "bf16": []}
    folded = trainer.fit(cfg("folded"), log=logs["folded"].append)
    line = [ln for ln in logs["folded"] if "BatchNorm folded" in ln]
    assert line == ["frozen early layers: BatchNorm folded into the convolution before it in 2 of them for the "
                    "training forward (fp32; the saved weights are the model's own)"]  # features.0/1, 4/5
    trainer.fit(cfg("bf16", precision="bf16"), log=logs["bf16"].append)
    assert not any("BatchNorm folded" in ln for ln in logs["bf16"])
    monkeypatch.setattr(trainer, "_fold_frozen_layers", lambda s: None)
    plain = trainer.fit(cfg("plain"), log=lambda *_: None)
    a = torch.load(folded.run_dir / "weights" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(plain.run_dir / "weights" / "last.pt", weights_only=True)["state_dict"]
    assert list(a) == list(b)
    for k in a:  # four SGD steps from the same start: the same weights up to float rounding
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5), k
