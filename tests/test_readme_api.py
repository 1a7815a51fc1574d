"""The README's Python API examples run as written (with a step limit and tiny data sets swapped in)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cnnkit
import cnnkit.engine.trainer as trainer
from cnnkit.data.scenes import generate_scenes

README = Path(__file__).resolve().parent.parent / "README.md"
PHOTOS = Path(cnnkit.__file__).parent / "assets" / "photos"


def api_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_an_example_per_task():
    blocks = api_blocks()
    for task in ("classify", "detect", "segment"):
        assert any(f'for_task("{task}"' in b for b in blocks), task


def test_readme_api_examples_run(tmp_path, monkeypatch):
    scenes = generate_scenes(tmp_path / "scenes", n_train=8, n_val=4, img_size=96, seed=3)
    real_fit = trainer.fit
    seen = []

    def quick_fit(cfg, **kwargs):
        cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.progress = 1, 2, 4, False
        if cfg.task == "classify":
            cfg.options.train_subset = 64
        else:
            cfg.data, cfg.img_size = str(scenes), 96
        result = real_fit(cfg, **kwargs)
        seen.append((cfg.task, result.run_dir))
        return result

    monkeypatch.setattr(trainer, "fit", quick_fit)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in api_blocks():
        exec(compile(block.replace("my_images/", str(PHOTOS)), "README.md", "exec"), namespace)
    assert [t for t, _ in seen] == ["classify", "detect", "segment"]
    for task, run_dir in seen:
        assert (run_dir / "weights" / "best.pt").is_file() and (run_dir / "report.html").is_file()
    assert any(Path("runs/detect/api-predict/labels").iterdir())
    assert len(list(Path("runs/segment/api-predict/masks").glob("*.png"))) == len(list(PHOTOS.iterdir()))
    assert (seen[-1][1] / "weights" / "best.onnx").is_file()
    assert Path(namespace["explain"].__module__).name  # the explain call ran
    assert list(Path("runs/explain").glob("conv-transpose*.png"))
