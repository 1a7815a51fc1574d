"""Each task's default model and training settings, as its task class declares them (`Task.defaults`):
`TASK_DEFAULTS[task]` = {"model", "model_kwargs", "config"}; `TrainConfig.for_task(task, **changes)` builds
the config. The figures behind each choice are in BENCHMARKS.md."""

from cnnkit.taskapi import task_class, task_names

TASK_DEFAULTS = {name: task_class(name).defaults for name in task_names()}
