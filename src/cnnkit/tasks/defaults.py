"""Each task's default model and training settings, as its task class declares them (`Task.defaults`):
`TASK_DEFAULTS[task]` = {"model", "model_kwargs", "config"}; `TrainConfig.for_task(task, **changes)` builds
the config. The figures behind each choice are in BENCHMARKS.md."""


def __getattr__(name: str):
    if name == "TASK_DEFAULTS":  # read from the registry when asked for (every task registered by then)
        from cnnkit.taskapi import all_defaults

        return all_defaults()
    raise AttributeError(name)
