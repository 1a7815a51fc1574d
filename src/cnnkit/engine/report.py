"""Run reports: one self-contained HTML page for one training run or several.

A section per run holds the run's config.yaml, its final metrics (the last row of metrics.csv),
the training curves (results.png), the task's picture of its final evaluation (`Task.figure`, e.g.
a confusion matrix or precision-recall curves), a per-class table and a gallery of the best and
worst validation images: weights/best.pt is evaluated again on the run's validation split, each
image scored by its task (`Task.score_batch`, what it means in `Task.score_meaning`) and drawn by its
task (`draw_example`). Every picture is a PNG embedded as a base64 `data:` URI and the CSS is inline, so
the file can be mailed or archived alone and opens without a network or JavaScript.
"""

from __future__ import annotations

import base64
import csv
import html
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

import cnnkit
from cnnkit.data.formats.yolo import is_number
from cnnkit.engine.checkpoint import atomic_write_text
from cnnkit.errors import DataError, UsageError, WeightsError

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#1f2328;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:.2em .6em;text-align:left}td.num{text-align:right;
font-variant-numeric:tabular-nums}th{background:#f6f8fa}img{max-width:100%;height:auto;display:block;
margin:.5em 0}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#59636e;font-size:.9em}.tables{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
"""


@dataclass
class _Scored:
    score: float
    index: int
    image: Any
    target: Any
    prediction: Any


@dataclass
class _Evaluation:
    metrics: dict[str, Any]
    names: list[str]
    task: Any
    epoch: int | None
    images: int
    best: list[_Scored] = field(default_factory=list)
    worst: list[_Scored] = field(default_factory=list)


def default_report_path(run_dirs: Iterable[str | os.PathLike]) -> Path:
    """RUN_DIR/report.html for one run; report.html in the current folder for several."""
    dirs = list(run_dirs)
    return Path(dirs[0]) / "report.html" if len(dirs) == 1 else Path("report.html")


def write_report(run_dirs, out_path, *, gallery: int = 8, device: str = "auto", batch_size: int = 64) -> Path:
    """Write one self-contained HTML report of the runs in `run_dirs` (a run folder or a list of
    them, each runs/<task>/<name>) to `out_path`, atomically; `gallery` best and as many worst
    validation images per run (0: no gallery). Returns the path written."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UsageError("no run folder given", fix="name one or more runs/<task>/<name> folders")
    if gallery < 0:
        raise UsageError(f"--gallery {gallery} is negative", fix="give 0 (no gallery) or more images")
    sections = [_run_section(d, i, gallery=gallery, device=device, batch_size=batch_size) for i, d in enumerate(dirs)]
    title = (f"cnnkit report: {dirs[0].parent.name}/{dirs[0].name}" if len(dirs) == 1
             else f"cnnkit report: {len(dirs)} runs")
    toc = ""
    if len(dirs) > 1:
        toc = "<ul>" + "".join(f'<li><a href="#run-{i + 1}">{html.escape(str(d))}</a></li>'
                               for i, d in enumerate(dirs)) + "</ul>"
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="note">written by cnnkit {html.escape(cnnkit.__version__)}</p>\n{toc}\n'
            + "\n".join(sections) + "\n</body>\n</html>\n")
    out = Path(out_path)
    atomic_write_text(out, page)
    return out


# ------------------------------------------------------------------------------------------ one run
def _run_section(run_dir: Path, i: int, *, gallery: int, device: str, batch_size: int) -> str:
    fix = "give a runs/<task>/<name> folder written by `cnnkit train`"
    if not run_dir.is_dir():
        raise DataError("run folder not found", path=str(run_dir), fix=fix)
    for f in ("config.yaml", "metrics.csv"):
        if not (run_dir / f).is_file():
            raise DataError(f"not a training run: no {f}", path=str(run_dir), fix=fix)
    config_text = (run_dir / "config.yaml").read_text()
    cfg = yaml.safe_load(config_text) or {}
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError("metrics.csv holds no epoch yet", path=str(run_dir / "metrics.csv"),
                        fix="report on a run that finished at least one epoch")
    best_pt = run_dir / "weights" / "best.pt"
    if not best_pt.is_file():
        raise WeightsError("the run has no weights/best.pt", path=str(run_dir),
                           fix="report on a run that finished at least one epoch")
    ev = _evaluate(best_pt, gallery, device, batch_size)
    task = ev.task
    last = rows[-1]
    fit_key = f"val_{task.fitness}"
    best_fit = max((float(r[fit_key]) for r in rows if r.get(fit_key) not in (None, "")), default=None)

    parts = [f'<section id="run-{i + 1}">',
             f"<h2>{html.escape(str(run_dir))}</h2>",
             f"<p>{html.escape(task.name)}: <b>{html.escape(str(cfg.get('model', '?')))}</b> on "
             f"{html.escape(str(cfg.get('data', '?')))}; {html.escape(last.get('epoch', '?'))} of "
             f"{html.escape(str(cfg.get('epochs', '?')))} epochs"
             + (f"; best {html.escape(fit_key)} {best_fit:.4f}" if best_fit is not None else "") + "</p>"]

    parts.append('<h3>Final metrics</h3>\n<p class="note">the last row of metrics.csv (epoch '
                 f'{html.escape(last.get("epoch", "?"))})</p>')
    parts.append(_table(["metric", "value"], [(k, v) for k, v in last.items()], cls="final-metrics"))

    epoch = f"epoch {ev.epoch + 1}" if ev.epoch is not None else "best epoch"
    parts.append(f'<h3>weights/best.pt on the validation split</h3>\n<p class="note">{epoch}, {ev.images} images, '
                 "evaluated again for this report</p>")
    scalars = [(k, _fmt(v)) for k, v in ev.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    tables = [_table(["metric", "value"], scalars, cls="best-metrics")]
    per_class = {k: v for k, v in ev.metrics.items() if k.startswith("per_class") and isinstance(v, dict) and v}
    if per_class:
        heads = [("accuracy" if k == "per_class" else k.removeprefix("per_class_")) for k in per_class]
        tables.append(_table(["class"] + heads, [[name] + [_fmt(v.get(name)) for v in per_class.values()]
                                                 for name in ev.names], cls="per-class"))
    parts.append('<div class="tables">' + "".join(tables) + "</div>")

    with tempfile.TemporaryDirectory(prefix="cnnkit-report-") as tmp:
        tmp = Path(tmp)
        parts.append("<h3>Training curves</h3>")
        curves = run_dir / "results.png"
        if not curves.is_file():
            from cnnkit.engine.runs import plot_curves, read_metrics_csv

            curves = tmp / "results.png"
            plot_curves(read_metrics_csv(run_dir / "metrics.csv"), curves, task.fitness, task.metric_names)
        parts.append(_img(curves.read_bytes(), "training curves"))

        figure = task.figure
        if figure:
            name, what = figure
            path, note = run_dir / name, f"{name} of the run's final evaluation"
            if not path.is_file():
                task.draw(ev.metrics, tmp, names=ev.names)
                path, note = tmp / name, "weights/best.pt on the validation split"
            parts.append(f'<h3>{what.capitalize()}</h3>\n<p class="note">{html.escape(note)}</p>')
            parts.append(_img(path.read_bytes(), what))

        if gallery:
            parts.append(_gallery_html(ev, tmp))

    parts.append("<h3>Config</h3>\n<p class=\"note\">config.yaml</p>")
    parts.append(f'<pre class="config">{html.escape(config_text)}</pre>')
    parts.append("</section>")
    return "\n".join(parts)


def _evaluate(best_pt: Path, gallery: int, device: str, batch_size: int) -> _Evaluation:
    """best.pt on its own validation split (built as `cnnkit val` builds it): the task's metrics,
    and the `gallery` best- and worst-scored images with their predictions."""
    from cnnkit.engine.inference import load_trained, validation_loader
    from cnnkit.engine.loop import evaluate

    t = load_trained(best_pt, device=device)
    try:
        loader, _ = validation_loader(t, None, batch_size)
    except DataError as exc:
        raise DataError(f"the run's data no longer fits its checkpoint: {exc.reason}", path=exc.path,
                        fix="report on the data the run was trained on") from None
    metrics = evaluate(t.model, t.task, loader, t.run, names=t.names)
    epoch = t.ckpt.get("epoch")
    ev = _Evaluation(metrics, t.names, t.task, int(epoch) if epoch is not None else None, int(metrics.get("images", 0)))
    if gallery:
        _score_gallery(ev, t, loader, gallery)
    return ev


@torch.no_grad()
def _score_gallery(ev: _Evaluation, t, loader, gallery: int) -> None:
    """Every validation image scored by its task (`score_batch`); keeps the `gallery` best and worst."""
    from cnnkit.engine.loop import outputs_of

    kept: list[_Scored] = []
    n = 0
    for images, targets in loader:
        outputs = outputs_of(t.model, t.run.inputs(images, t.task), t.run)
        scored = t.task.score_batch(outputs, targets)
        for j, (score, pred) in enumerate(scored):
            target = targets[j]
            target = target.clone() if hasattr(target, "clone") else target
            kept.append(_Scored(float(score), n + j, images[j].clone(), target, pred))
        n += len(scored)
        if len(kept) > 4 * gallery:
            kept = _ends(kept, gallery)
    kept = sorted(kept, key=lambda e: (e.score, -e.index))
    n_best, n_worst = min(gallery, (n + 1) // 2), min(gallery, n // 2)  # never the same image twice
    ev.best = kept[::-1][:n_best]
    ev.worst = kept[:n_worst]
    ev.images = n


def _ends(items: list[_Scored], k: int) -> list[_Scored]:
    """The k lowest and k highest scored (ties: the later image counts as lower)."""
    items = sorted(items, key=lambda e: (e.score, -e.index))
    return items[:k] + items[-k:] if len(items) > 2 * k else items


def _gallery_html(ev: _Evaluation, tmp: Path) -> str:
    from cnnkit.plots import plot_grid

    parts = ['<h3>Validation gallery</h3>\n<p class="note">weights/best.pt on every validation image, '
             f"scored by the task ({html.escape(ev.task.score_meaning)}); the best "
             "and the worst</p>"]
    for label, items, colour in (("best", ev.best, "#1a7f37"), ("worst", ev.worst, "#b42318")):
        if not items:
            continue
        pics, caps = [], []
        for e in items:
            drawn = ev.task.draw_example(e.image, e.target, e.prediction, e.score, ev.names)
            pics += [p for p, _ in drawn]
            caps += [f"#{e.index} {c}" if j == 0 else c for j, (_, c) in enumerate(drawn)]
        per = max(1, len(pics) // len(items))
        path = plot_grid(pics, caps, tmp / f"gallery_{label}.png", colors=[colour] * len(pics),
                         cols=per * max(1, 8 // per))
        parts.append(f"<h4>{len(items)} {label}</h4>")
        parts.append(_img(path.read_bytes(), f"{label} validation predictions"))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ HTML bits
def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _table(header: list[str], rows, cls: str) -> str:
    def cell(v, tag="td"):
        text = str(v)
        attr = ' class="num"' if tag == "td" and is_number(text) else ""
        return f"<{tag}{attr}>{html.escape(text)}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>"
    body = "".join("<tr>" + cell(r[0], "th") + "".join(cell(v) for v in r[1:]) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>'


