"""Run reports: a tiny real run of each task, its report.html (written by `fit`, by `write_report`
and by `cnnkit report`), checked as HTML (every picture an embedded PNG that decodes, the metrics
equal to metrics.csv's last row, the config, per-class table and gallery present) and, where a
Chromium is installed, rendered headless with every picture loaded."""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.scenes import generate_scenes
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.trainer import fit
from cnnkit.errors import CnnkitError
from cnnkit.report import write_report

COMMON = dict(epochs=1, max_steps=2, progress=False, precision="fp32", workers=0, seed=0, name="r")


class _Page(HTMLParser):
    """Collects every <img> src, the text of each table by class, and the <pre class=config> text."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.configs: list[str] = []
        self.sections = 0
        self.external: list[str] = []
        self._table = None
        self._cell: list[str] | None = None
        self._pre = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("link", "script", "iframe") or (tag == "a" and not a.get("href", "#").startswith("#")):
            self.external.append(tag)
        elif tag == "section":
            self.sections += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("class", ""), [])
            self._table.append([])
        elif tag == "tr" and self._table is not None:
            self._table[-1].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "pre" and a.get("class") == "config":
            self._pre = True
            self.configs.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre:
            self.configs[-1] += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def last_row(run: Path) -> dict[str, str]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_dir):
    """One tiny finished run per task (two optimizer steps each). The classify run draws its pictures
    and its report as `cnnkit train` does; detect and segment run with plots=False, so they have no
    pictures and no report, and a report of them draws curves and figures itself."""
    root = tmp_path_factory.mktemp("report")
    scenes = generate_scenes(root / "scenes", n_train=8, n_val=4, img_size=64, seed=1)
    project = str(root / "runs")
    cfgs = {
        "classify": TrainConfig(task="classify", model="vgg11_bn", model_kwargs={"width": 0.125, "pool_size": 1},
                                data=str(shapes_dir), batch_size=8, img_size=32, project=project, **COMMON),
        "detect": TrainConfig(task="detect", model="yolov1_fast", model_kwargs={"width": 0.125}, data=str(scenes),
                              batch_size=4, img_size=64, optimizer="adamw", lr=1e-3, project=project, plots=False, **COMMON),
        "segment": TrainConfig(task="segment", model="unet", model_kwargs={"backbone": "vgg11", "width": 0.25},
                               data=str(scenes), batch_size=4, img_size=64, project=project, plots=False, **COMMON),
    }
    return {task: fit(cfg, log=lambda *_: None).run_dir for task, cfg in cfgs.items()}


def check_page(path: Path, run_dirs: list[Path], gallery: int) -> _Page:
    """Self-contained, every picture a PNG that decodes, the run's metrics, config and tables in it."""
    page = parse(path)
    assert page.sections == len(run_dirs)
    assert not page.external, page.external
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", text)
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            assert im.format == "PNG"
            im.verify()
    # per run: curves + task figure (+ best and worst galleries)
    assert len(page.images) == len(run_dirs) * (2 + 2 * (gallery > 0))
    finals = page.tables["final-metrics"]
    assert len(finals) == len(run_dirs)
    for table, run in zip(finals, run_dirs):
        shown = {row[0]: row[1] for row in table[1:]}
        assert shown == last_row(run)
    assert page.configs == [(run / "config.yaml").read_text() for run in run_dirs]
    return page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_all_images_loaded(path: Path, tmp_path: Path) -> tuple[int, int]:
    """Open a copy of the page in headless Chromium with a probe script added; returns (images,
    images that decoded with a width), read from the title the probe sets."""
    probe = ("<script>addEventListener('load',()=>{const i=[...document.images];"
             "document.title='LOADED '+i.length+' '+i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>")
    copy = tmp_path / "probe.html"
    copy.write_text(path.read_text().replace("</body>", probe + "</body>"))
    out = subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                          "--user-data-dir=" + str(tmp_path / "chrome"), "--virtual-time-budget=10000",
                          "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>LOADED (\d+) (\d+)</title>", out.stdout)
    assert m, out.stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_fit_writes_its_report_when_it_draws(runs):
    run = runs["classify"]
    out = run / "report.html"
    page = check_page(out, [run], gallery=8)
    (table,) = page.tables["per-class"]
    assert table[0] == ["class", "accuracy"] and [r[0] for r in table[1:]] == ["circle", "dots", "square", "stripes"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in table[1:])
    # 24 validation images: the 8 best and the 8 worst
    assert "<h4>8 best</h4>" in out.read_text() and "<h4>8 worst</h4>" in out.read_text()
    assert not (runs["detect"] / "report.html").exists() and not (runs["segment"] / "report.html").exists()


def test_several_runs_on_one_page_and_rendered(runs, tmp_path):
    dirs = list(runs.values())
    out = write_report(dirs, tmp_path / "all.html", gallery=2)
    page = check_page(out, dirs, gallery=2)
    heads = [t[0][1:] for t in page.tables["per-class"]]
    assert heads == [["accuracy"], ["AP50", "AP"], ["IoU"]]
    if chromium():  # the page as a browser shows it: every picture decoded
        n, loaded = render_all_images_loaded(out, tmp_path)
        assert n == len(page.images) == loaded


def test_cli_report(runs, tmp_path, capsys):
    run = runs["segment"]
    out = tmp_path / "seg.html"
    assert main(["report", str(run), "--out", str(out), "--gallery", "0"]) == 0
    assert str(out) in capsys.readouterr().out
    check_page(out, [run], gallery=0)
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["report", str(run), "--gallery", "-1"]) == 2


def test_not_a_run_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnkitError, match="config.yaml"):
        write_report([tmp_path / "empty"], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_demo_ends_with_one_report_of_the_runs_it_made(runs, tmp_path, monkeypatch, capsys):
    from cnnkit import demo

    # the runs fit returned (here the fixture's, named r, not demo): the page covers exactly those
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_run_task", lambda task, quick: runs[task])
    assert demo.run_demo(quick=True, tasks=("classify", "segment")) == 0
    out = tmp_path / "runs" / "demo_report.html"
    assert str(Path("runs") / "demo_report.html") in capsys.readouterr().out
    check_page(out, [runs["classify"], runs["segment"]], gallery=8)


def test_per_image_scores_by_hand():
    import torch

    from cnnkit.tasks.classify import ClassifyTask
    from cnnkit.tasks.detect import DetectTask
    from cnnkit.tasks.segment import SegmentTask


    # classify: the softmax probability of the true class, softmax(0, ln 3) = (1/4, 3/4)
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    task = ClassifyTask()
    task.configure({"mean": [0, 0, 0], "std": [1, 1, 1]})
    ((s, (pred, prob)),) = task.score_batch(logits, torch.tensor([0]))
    assert s == pytest.approx(0.25) and pred == 1 and prob == pytest.approx(0.75)

    # segment: counted pixels (truth, pred) = (0,0), (0,1), (1,1); IoU 1/2 for both classes
    seg_logits = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]]])
    masks = torch.tensor([[[0, 0], [1, 255]]])
    ((s, mask),) = SegmentTask().score_batch(seg_logits, masks)
    assert s == pytest.approx(0.5) and mask.tolist() == [[0, 1], [1, 1]]

    # detect: truth a class-0 and a class-1 box; one exact hit, one class-1 box elsewhere -> F1 2/(2+1+1)
    task = DetectTask()
    dets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([0, 1])},
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    task.decode = lambda raw, conf_threshold: dets
    truth = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    raw = torch.zeros(2, 3, 3, 5 * 2 + 2)  # YOLO outputs of 2 images: S 3, B 2, C 2 (what decode reads)
    (s1, p1), (s2, p2) = task.score_batch(raw, truth)
    assert s1 == pytest.approx(0.5) and (p1["tp"], p1["fp"], p1["n_pos"]) == (1, 1, 2)
    assert s2 == 1.0  # nothing there and nothing found
