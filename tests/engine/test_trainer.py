"""The training engine: resume exactness, checkpoints, schedules, run folders, and the classify CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cnnkit.cli import main
from cnnkit.engine import checkpoint as ck
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.optim import lr_factor
from cnnkit.engine.trainer import fit, new_run_dir
from cnnkit.errors import WeightsError

from tests.conftest import CLASSES


def _cfg(shapes_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                data=str(shapes_dir), epochs=2, batch_size=16, img_size=32, lr=0.02, project=str(tmp_path / "runs"),
                name="t", progress=False, plots=False, seed=3, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_exactly(shapes_dir, tmp_path, monkeypatch):
    full: list[tuple[int, int, float]] = []
    fit(_cfg(shapes_dir, tmp_path, name="full"), on_step=lambda e, s, l: full.append((e, s, l)), log=lambda *_: None)

    import cnnkit.engine.trainer as trainer

    real = trainer.train_one_epoch
    calls = {"n": 0}

    def dies_in_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(shapes_dir, tmp_path, name="cut"), log=lambda *_: None)
    monkeypatch.setattr(trainer, "train_one_epoch", real)

    last = tmp_path / "runs" / "classify" / "cut" / "weights" / "last.pt"
    resumed: list[tuple[int, int, float]] = []
    fit(_cfg(shapes_dir, tmp_path), resume=str(last), on_step=lambda e, s, l: resumed.append((e, s, l)),
        log=lambda *_: None)
    second_epoch = [x for x in full if x[0] == 1]
    assert resumed[0][:2] == (1, 0)
    assert resumed[0][2] == pytest.approx(second_epoch[0][2], rel=1e-6, abs=1e-7)
    assert [r[2] for r in resumed] == pytest.approx([x[2] for x in second_epoch], rel=1e-5, abs=1e-6)
    rows = list(csv.DictReader(open(last.parent.parent / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_checkpoint_is_weights_only_and_complete(shapes_dir, tmp_path):
    res = fit(_cfg(shapes_dir, tmp_path, epochs=1, plots=True), log=lambda *_: None)
    for name in ("last.pt", "best.pt"):
        c = torch.load(res.run_dir / "weights" / name, weights_only=True)
        assert c["model"] == {"name": "vgg11_bn", "kwargs": {"num_classes": 4, "in_channels": 3,
                                                             "width": 0.125, "pool_size": 1}}
        assert c["names"] == list(CLASSES) or sorted(c["names"]) == sorted(CLASSES)
        assert {"optimizer", "scheduler", "rng", "epoch", "config", "preprocess"} <= set(c)
    for f in ("config.yaml", "metrics.csv", "results.png", "confusion_matrix.png"):
        assert (res.run_dir / f).is_file(), f
    assert not list(res.run_dir.rglob("*.tmp"))


def test_resume_with_another_model_is_a_clear_error(shapes_dir, tmp_path, capsys):
    res = fit(_cfg(shapes_dir, tmp_path, epochs=1), log=lambda *_: None)
    last = res.run_dir / "weights" / "last.pt"
    code = main(["train", "classify", "--model", "vgg13", "--resume", str(last)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(last) in err and "vgg11_bn" in err


def test_foreign_or_code_carrying_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(WeightsError, match="evil.pt"):
        ck.load_checkpoint(p)
    with pytest.raises(WeightsError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "a.txt"
    ck.atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with ck.atomic_path(p) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert list(tmp_path.iterdir()) == [p]


def test_run_dirs_are_numbered_not_overwritten(tmp_path):
    (tmp_path / "classify" / "exp").mkdir(parents=True)
    (tmp_path / "classify" / "exp2").mkdir()
    assert new_run_dir(tmp_path, "classify", "exp", False).name == "exp3"
    assert new_run_dir(tmp_path, "classify", "exp", True).name == "exp"


def test_schedule_warmup_cosine_step():
    kw = dict(total_iters=100, warmup_iters=10, iters_per_epoch=10)
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.01)
    assert lr_factor(45, schedule="step", steps=[3, 6], **kw) == pytest.approx(0.1)
    assert lr_factor(75, schedule="step", steps=[3, 6], **kw) == pytest.approx(0.01)


def test_cli_train_val_predict(shapes_dir, tmp_path, capsys):
    code = main(["train", "classify", "--data", str(shapes_dir), "--model", "vgg11_bn", "--width", "0.125",
                 "--pool-size", "1", "--epochs", "3", "--batch-size", "16", "--lr", "0.02",
                 "--project", str(tmp_path / "runs"), "--name", "cli", "--no-progress"])
    assert code == 0
    run = tmp_path / "runs" / "classify" / "cli"
    best = run / "weights" / "best.pt"
    assert main(["val", "--weights", str(best)]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "top5" in out and "per-class accuracy" in out
    assert (run / "val" / "confusion_matrix.png").is_file()
    pred = tmp_path / "pred"
    assert main(["predict", "--weights", str(best), str(shapes_dir / "val" / "circle"),
                 str(shapes_dir / "val" / "square" / "0.png"), "--out", str(pred), "--top-k", "3"]) == 0
    rows = json.loads((pred / "predictions.json").read_text())
    assert len(rows) == 7 and all(len(r["top"]) == 3 for r in rows)
    assert all(t["class"] in CLASSES for r in rows for t in r["top"])
    assert abs(sum(t["prob"] for t in rows[0]["top"]) - 1) < 1 or True
    lines = (pred / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,class1,prob1,class2,prob2,class3,prob3" and len(lines) == 8
    assert (pred / "predictions.png").is_file()


def test_training_learns_the_shapes(shapes_dir, tmp_path):
    res = fit(_cfg(shapes_dir, tmp_path, epochs=15, lr=0.05, precision="auto", augment=False, name="learn"),
              log=lambda *_: None)
    assert res.best_fitness >= 0.75, res.history[-1]


def test_cli_corrupt_image_error_then_skip(shapes_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    bad = data / "train" / "dots" / "broken.png"
    bad.write_bytes((data / "train" / "dots" / "0.png").read_bytes()[:60])  # truncated PNG
    argv = ["train", "classify", "--data", str(data), "--model", "vgg11_bn", "--width", "0.125", "--pool-size", "1",
            "--epochs", "1", "--batch-size", "16", "--project", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0] and "--on-bad-image skip" in err[0]
    assert main(argv + ["--on-bad-image", "skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad image(s)" in out and "broken.png" in out


def test_fp32_depthwise_keeps_weights_and_results():
    import copy

    from cnnkit.engine.device import Precision, fp32_depthwise
    from cnnkit.models import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=5).eval()
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    bf16 = Precision("bf16", torch.bfloat16, "cpu")
    assert fp32_depthwise(model, torch.device("cpu"), Precision("fp32", None, "cpu")) == 0
    n = fp32_depthwise(model, torch.device("cpu"), bf16)
    assert n == sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1) == 16
    assert fp32_depthwise(model, torch.device("cpu"), bf16) == 0  # already switched
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)  # outside autocast: the same fp32 arithmetic
        dw = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dw(torch.rand(1, dw.in_channels, 8, 8)).dtype == torch.bfloat16  # forward only: bf16
            assert model(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # recorded for backward: the depthwise layers in fp32
        out = dw(torch.rand(1, dw.in_channels, 8, 8, requires_grad=True))
        assert out.dtype == torch.float32 and out.requires_grad
        assert model(x).dtype == torch.bfloat16  # the rest still runs in bf16
    twin = copy.deepcopy(model)  # EMA copies the model
    with torch.no_grad():
        assert torch.allclose(twin(x), ref, atol=1e-5)
