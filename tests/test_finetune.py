"""Fine-tuning controls: a frozen backbone gets no gradients and its BatchNorm statistics do not move;
--unfreeze-at trains it again; --backbone-lr-scale gives it its own learning rate."""

from __future__ import annotations

import pytest
import torch

from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.finetune import is_frozen_at, set_backbone_frozen, train_mode
from cnnkit.engine.optim import build_optimizer, parameter_groups
from cnnkit.engine.trainer import fit
from cnnkit.models import build_model
from cnnkit.models.backbones import backbone_parameters, head_parameters


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
