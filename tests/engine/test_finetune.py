"""Fine-tuning controls: a frozen backbone gets no gradients and its BatchNorm statistics do not move;
--unfreeze-at trains it again; --backbone-lr-scale gives it its own learning rate."""

from __future__ import annotations

import pytest
import torch

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.finetune import freeze_early, is_frozen_at, set_backbone_frozen, train_mode
from cnnkit.engine.optim import build_optimizer, parameter_groups
from cnnkit.engine.trainer import fit
from cnnkit.models import build_model
from cnnkit.models.backbones import backbone_parameters, early_layers, head_parameters


def _small():
    return build_model("vgg11_bn", num_classes=4, width=0.125, pool_size=1)


def test_frozen_backbone_gets_no_gradient_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = _small()
    set_backbone_frozen(model, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(parameter_groups(model, 5e-4, 0.1, backbone=backbone_parameters(model)), "sgd", 0.1, 0.9)
    for _ in range(3):
        train_mode(model)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in backbone_parameters(model))
    after = model.state_dict()
    backbone_keys = [k for k in before if k.startswith("features.")]
    assert any("running_mean" in k for k in backbone_keys)
    for k in backbone_keys:
        assert torch.equal(before[k], after[k]), k  # weights and BatchNorm running statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("classifier."))
    set_backbone_frozen(model, False)
    train_mode(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def _names(model, layers):
    named = {id(m): n for n, m in model.named_modules()}
    return [named[id(m)] for m in layers]


def test_early_layers_are_those_at_the_given_stride():
    vgg = _small()  # features: conv0 bn1 relu pool3 | conv4 bn5 relu pool7 | conv8 bn9 relu conv11 bn12 relu pool14 ...
    assert _names(vgg, early_layers(vgg, 1)) == ["features.0", "features.1"]
    assert _names(vgg, early_layers(vgg, 2)) == ["features.0", "features.1", "features.4", "features.5"]
    assert _names(vgg, early_layers(vgg, 4))[-4:] == ["features.8", "features.9", "features.11", "features.12"]
    resnet = build_model("resnet18", num_classes=3)  # stem at stride 2, layer1 at 4, layer2 at 8
    assert _names(resnet, early_layers(resnet, 2)) == ["conv1", "bn1"]
    assert _names(resnet, early_layers(resnet, 4))[-1] == "layer1.1.bn2"
    assert not any(n.startswith("layer2") for n in _names(resnet, early_layers(resnet, 4)))
    unet = build_model("unet", num_classes=3, width=0.25)  # a segmenter: only its backbone is searched
    names = _names(unet, early_layers(unet, 4))
    assert names[0] == "backbone.body.conv_stem" and all(n.startswith("backbone.") for n in names)
    assert "backbone.body.blocks.1.1.conv_pwl" in names and not any(".blocks.3." in n for n in names)


def test_freeze_early_keeps_the_high_resolution_layers_fixed_all_run():
    torch.manual_seed(0)
    model = _small()
    assert freeze_early(model, 0) == 0
    n = freeze_early(model, 2)
    layers = [model.features[i] for i in (0, 1, 4, 5)]  # the convolutions and BatchNorms at strides 1 and 2
    assert n == sum(len(list(m.parameters(recurse=False))) for m in layers)
    early = {id(p) for m in early_layers(model, 2) for p in m.parameters(recurse=False)}
    assert len(early) == n
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(parameter_groups(model, 5e-4, 0.1), "sgd", 0.1, 0.9)
    for _ in range(2):
        train_mode(model)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        layer = k.rsplit(".", 1)[0]
        if layer in ("features.0", "features.1", "features.4", "features.5"):
            assert torch.equal(before[k], after[k]), k  # weights and BatchNorm statistics alike
        elif k.endswith(("weight", "running_mean")) and not k.startswith("features.0"):
            assert not torch.equal(before[k], after[k]), k
    set_backbone_frozen(model, True)
    set_backbone_frozen(model, False)  # --unfreeze-at trains the backbone again, never the early layers
    assert sum(not p.requires_grad for p in model.parameters()) == n
    train_mode(model)
    assert not model.features[1].training and model.features[9].training
    model.eval()
    train_mode(torch.nn.DataParallel(model))  # wrapped (DDP, torch.compile): the same layers stay in eval mode
    assert not model.features[1].training and model.features[9].training


def test_backbone_and_head_partition_the_parameters():
    model = _small()
    bb, head = backbone_parameters(model), head_parameters(model)
    assert {id(p) for p in bb}.isdisjoint(id(p) for p in head)
    assert len(bb) + len(head) == len(list(model.parameters()))


def test_backbone_lr_scale_makes_its_own_groups():
    model = _small()
    groups = parameter_groups(model, 5e-4, 0.1, backbone=backbone_parameters(model), backbone_lr_scale=0.1)
    lrs = {(g["backbone"], g["weight_decay"] > 0): g["lr"] for g in groups}
    assert lrs[(True, True)] == pytest.approx(0.01) and lrs[(False, True)] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_is_frozen_at():
    assert [is_frozen_at(e, True, 3) for e in range(4)] == [True, True, False, False]
    assert all(is_frozen_at(e, True, 0) for e in range(5))
    assert not any(is_frozen_at(e, False, 2) for e in range(3))


def test_unfreeze_at_trains_the_backbone_again(shapes_dir, tmp_path):
    cfg = TrainConfig(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                      data=str(shapes_dir), epochs=2, batch_size=16, img_size=32, lr=0.05, project=str(tmp_path),
                      name="ft", progress=False, plots=False, seed=5, precision="fp32",
                      freeze_backbone=True, unfreeze_at=2)
    last = tmp_path / "classify" / "ft" / "weights" / "last.pt"
    snaps, lines = [], []

    def log(line):
        lines.append(line)
        if line.startswith("epoch "):
            snaps.append(ck.load_checkpoint(last)["state_dict"])

    fit(cfg, log=log)
    ck.seed_everything(5)  # fit seeds, then builds the model: the same initial weights
    initial = build_model("vgg11_bn", num_classes=4, in_channels=3, width=0.125, pool_size=1).state_dict()
    first, second = snaps[0], snaps[-1]
    conv = "features.0.weight"
    assert torch.equal(first[conv], initial[conv])  # frozen in epoch 1
    assert torch.equal(first["features.1.running_mean"], initial["features.1.running_mean"])
    assert not torch.equal(second[conv], first[conv])  # trained in epoch 2
    assert not torch.equal(first["classifier.6.weight"], initial["classifier.6.weight"])
    assert any("backbone unfrozen" in line for line in lines)


@pytest.mark.slow
def test_compile_trains_and_saves_the_bare_model(shapes_dir, tmp_path):
    cfg = TrainConfig(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                      data=str(shapes_dir), epochs=1, batch_size=16, img_size=32, project=str(tmp_path),
                      name="c", progress=False, plots=False, precision="fp32", compile=True, ema=True,
                      freeze_early=2)
    result = fit(cfg, log=lambda *a: None)
    state = ck.load_checkpoint(result.run_dir / "weights" / "last.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["state_dict"])
    assert list(state["state_dict"]) == list(build_model("vgg11_bn", num_classes=4, width=0.125,
                                                         pool_size=1).state_dict())
    assert result.metrics["top1"] >= 0
