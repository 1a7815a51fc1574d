"""The one prediction loop of every task: image files in, the task's files out.

    trained = load_trained("runs/detect/exp/weights/best.pt")
    rows = predict_files(trained, ["my_images/"], out_dir="runs/detect/predict", options={"conf_threshold": 0.25})

The task decodes a chunk of files (`predict_inputs`), the engine moves it to the device, prepares it
(normalisation, layout) and runs the model under the run's autocast, the task turns the outputs into
one prediction per image (`predict_step`) and its writer writes each and, at the end, the files that
cover them all (`prediction_writer`). `options` holds the task's `cnnkit predict` flags
(`Task.predict_flags`, e.g. top_k, conf_threshold); a missing one takes its declared default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnkit.engine.loop import outputs_of
from cnnkit.taskapi import flag_dest


def predict_options(task, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's predict options: its declared defaults, then what was given (None = not given)."""
    out = {flag_dest(flag): spec.get("default") for flag, spec in task.predict_flags.items()}
    out.update({k: v for k, v in (given or {}).items() if v is not None})
    return out


@torch.no_grad()
def predict_files(trained, sources, *, out_dir, batch_size: int = 16, options: dict[str, Any] | None = None,
                  log=print) -> list[dict]:
    """Predict every image of `sources` (files or folders, recursively) into out_dir; one row per image
    (a dict with at least "path" and "summary")."""
    from cnnkit.data.images import square_batch
    from cnnkit.data.sources import collect_image_paths

    task, run = trained.task, trained.run
    paths = collect_image_paths(sources)
    opts = predict_options(task, options)
    writer = task.prediction_writer(trained, paths, Path(out_dir), opts, log)
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        inputs = task.predict_inputs(trained, chunk)
        if inputs is None:  # the default: decoded, in the model's channels, resized to its square input
            inputs = square_batch(chunk, trained.img_size, int(trained.ckpt.get("preprocess", {}).get("channels", 3)))
        originals, batch = inputs
        outputs = outputs_of(trained.model, run.inputs(batch, task), run)
        for path, original, prediction in zip(chunk, originals, task.predict_step(trained, outputs, opts)):
            rows.append(writer.add(path, original, prediction))
    writer.close()
    return rows
