"""The task registry (`cnnkit.taskapi`): a fourth task defined entirely in this file, "count the items in
a scene" (a regression head on a registry classifier), registered, then trained, validated, predicted and
reported through the real CLI entry point with no edit to src/; plus the walls the registry keeps: every
task's flags and models stay its own, and the engine, CLI, report and demo never name a task."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnnkit
from cnnkit.cli import main
from cnnkit.taskapi import (COUNT, EvalState, PredictionWriter, Task, TaskData, TaskOptions, get_task, option,
                            register_task, task_names, unregister_task)

SRC = Path(cnnkit.__file__).parent


# ------------------------------------------------------------------------------------- the toy task
@dataclass
class CountOptions(TaskOptions):
    max_count: int = option(10, "counts above this are clipped in the loss", type=COUNT)
    count_loss: str = option("mse", "regression loss", choices=("mse", "l1"))


class CountTask(Task):
    """How many items are in a scene: the scene data's boxes, counted; one output of a classifier."""

    name = "count_items"
    fitness = "exact"
    metric_names = ("loss", "mae", "exact")
    Options = CountOptions
    model_kinds = ("classify",)
    defaults = dict(model="vgg11", model_kwargs={"width": 0.125, "pool_size": 1},
                    config={"img_size": 32, "epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.003})
    score_meaning = "minus the absolute error of the count"

    def build_data(self, cfg) -> TaskData:
        from torchvision.transforms import v2

        from cnnkit.data.detection import load_detection_data

        d = load_detection_data(cfg.data)
        resize = v2.Resize((cfg.img_size, cfg.img_size), antialias=True)
        d.train.transform, d.val.transform = resize, resize
        self.max_count = cfg.options.max_count if cfg.options else 10
        self.count_loss = cfg.options.count_loss if cfg.options else "mse"
        meta = {"img_size": cfg.img_size, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
        return TaskData(Counted(d.train), Counted(d.val), ["items"], source=d.source, meta=meta, in_memory=True)

    def build_model(self, cfg, data):
        from cnnkit.models import build_model

        return build_model(cfg.model, num_classes=1, **cfg.model_kwargs)

    def loss(self, model, images, targets):
        pred = model(images).float().squeeze(1)
        truth = targets.float().clamp(max=getattr(self, "max_count", 10))
        loss = F.l1_loss(pred, truth) if getattr(self, "count_loss", "mse") == "l1" else F.mse_loss(pred, truth)
        return loss, {}

    def eval_start(self, names, device):
        return EvalState(sums={"loss": 0.0, "abs": 0.0, "exact": 0, "n": 0})

    def eval_step(self, state, outputs, images, targets):
        pred = outputs.squeeze(1)
        state.add(loss=float(F.mse_loss(pred, targets.float(), reduction="sum")),
                  abs=float((pred - targets).abs().sum()), exact=int((pred.round() == targets).sum()),
                  n=len(targets))
        return pred.tolist()

    def summarise(self, state, names):
        n = max(1, state.sums["n"])
        return {"loss": state.sums["loss"] / n, "mae": state.sums["abs"] / n, "exact": state.sums["exact"] / n,
                "images": state.sums["n"]}

    def score_batch(self, outputs, targets):
        return [(-abs(float(p) - float(t)), float(p)) for p, t in zip(outputs.squeeze(1), targets)]

    def draw_example(self, image, target, prediction, score, names):
        return [(image.permute(1, 2, 0).numpy(), f"{int(target)} items, counted {prediction:.1f}")]

    def predict_step(self, trained, outputs, options):
        return outputs.squeeze(1).tolist()

    def prediction_writer(self, trained, paths, out_dir, options, log):
        return CountWriter(Path(out_dir))


class Counted(torch.utils.data.Dataset):
    """(image, number of boxes) of a detection dataset."""

    def __init__(self, detection):
        self.detection = detection

    def __len__(self):
        return len(self.detection)

    def __getitem__(self, i):
        image, target = self.detection[i]
        return image, torch.tensor(len(target["boxes"]))


class CountWriter(PredictionWriter):
    def __init__(self, out_dir: Path):
        self.out_dir, self.rows = out_dir, []

    def add(self, path, original, prediction):
        row = {"path": str(path), "count": round(prediction, 3), "summary": f"{path}: {prediction:.1f} items"}
        self.rows.append(row)
        return row

    def close(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "counts.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "count"])
            w.writeheader()
            w.writerows({"path": r["path"], "count": r["count"]} for r in self.rows)


@pytest.fixture
def count_task():
    register_task(CountTask)
    yield CountTask
    unregister_task(CountTask.name)


# ------------------------------------------------------------------------------------------ tests
def test_a_fourth_task_trains_validates_predicts_and_reports_through_the_cli(count_task, tiny_scenes, tmp_path,
                                                                             capsys):
    data = str(next(tiny_scenes.glob("*.yaml")))
    assert "count_items" in task_names()
    code = main(["train", "count_items", "--data", data, "--max-count", "8", "--count-loss", "l1",
                 "--project", str(tmp_path / "runs"), "--name", "c", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = tmp_path / "runs" / "count_items" / "c"
    assert "exact" in out and (run / "weights" / "best.pt").is_file() and (run / "report.html").is_file()
    config = (run / "config.yaml").read_text()
    assert "max_count: 8" in config and "count_loss: l1" in config  # the task's options, kept with the run

    assert main(["val", "--weights", str(run / "weights" / "best.pt")]) == 0
    assert re.search(r"mae\s+\d", capsys.readouterr().out)

    pred = tmp_path / "pred"
    assert main(["predict", str(tiny_scenes / "images" / "val"), "--weights", str(run / "weights" / "best.pt"),
                 "--out", str(pred)]) == 0
    rows = list(csv.DictReader(open(pred / "counts.csv")))
    assert len(rows) == 6 and all(float(r["count"]) == float(r["count"]) for r in rows)
    capsys.readouterr()

    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--gallery", "2"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "minus the absolute error of the count" in page and "count_items" in page


def test_a_task_refuses_another_tasks_flag_and_model_in_one_line(count_task, capsys):
    assert main(["train", "count_items", "--dice-weight", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dice-weight" in err and "segment" in err and "--max-count" in err
    assert main(["train", "classify", "--max-count", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "count_items" in err and "--label-smoothing" in err
    assert main(["train", "count_items", "--model", "yolov1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vgg11" in err and "yolo" not in err.split(";")[1]


def test_registering_a_second_task_under_a_taken_name_is_refused():
    class Impostor(Task):
        name = "classify"

    with pytest.raises(ValueError, match="already registered"):
        register_task(Impostor)
    assert type(get_task("classify")).__name__ == "ClassifyTask"


# ------------------------------------------------------------------------------------- the walls
def _python_files(*parts):
    for part in parts:
        path = SRC / part
        yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def test_engine_cli_report_and_demo_name_no_task():
    """The issue's grep: task names live only in their own task modules (and the registry's defaults)."""
    pattern = re.compile(r'cnnkit\.tasks|"detect"|"segment"|"classify"')
    hits = [f"{p.relative_to(SRC)}:{i}" for p in _python_files("engine", "cli.py", "report.py", "demo.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_a_registered_model_is_trained_by_its_task_only(capsys):
    """A model added in one file (`@register_model(name, task=...)`) is listed, built, and accepted by the
    tasks that train its kind only."""
    import torch.nn as nn

    from cnnkit.engine.config import check_model_for_task
    from cnnkit.errors import UsageError
    from cnnkit.models import build_model, list_models
    from cnnkit.models.inputs import name_key
    from cnnkit.models.registry import _REGISTRY, register_model

    @register_model("tiny_test_net", task="classify", description="a test's one-layer classifier")
    def tiny(num_classes: int = 10, in_channels: int = 3):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    try:
        assert "tiny_test_net" in list_models("classify")
        assert build_model("tiny_test_net", num_classes=3)(torch.zeros(1, 3, 8, 8)).shape == (1, 3)
        check_model_for_task("classify", "tiny_test_net")
        with pytest.raises(UsageError, match="the detect task trains"):
            check_model_for_task("detect", "tiny_test_net")
    finally:
        _REGISTRY.pop(name_key("tiny_test_net"))


def test_a_task_of_ones_own_module_is_loaded_by_name_from_cnnkit_tasks(tmp_path):
    """`CNNKIT_TASKS=module` imports the module when the registry is first read: a new command appears."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CNNKIT_TASKS": "tests.plugin_task", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "cnnkit", "train", "count_items", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--max-count" in out.stdout and "--count-loss" in out.stdout
    env["CNNKIT_TASKS"] = "no_such_module_here"
    bad = subprocess.run([sys.executable, "-m", "cnnkit", "models"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "CNNKIT_TASKS" in bad.stderr


def test_every_module_of_the_packages_is_imported():
    """cnnkit.tasks and cnnkit.models import every module they hold (that is what registers a new file),
    checked in a fresh interpreter that imports nothing else."""
    import subprocess
    import sys

    code = ("import pkgutil, sys, cnnkit.tasks, cnnkit.models\n"
            "for p in (cnnkit.tasks, cnnkit.models):\n"
            "    names = {f'{p.__name__}.{m.name}' for m in pkgutil.iter_modules(p.__path__)}\n"
            "    missing = sorted(names - set(sys.modules))\n"
            "    assert names and not missing, missing\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
