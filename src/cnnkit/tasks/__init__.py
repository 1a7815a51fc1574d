"""The built-in tasks. Importing this package imports every module in it, and each task module registers
its task with `cnnkit.taskapi` (`@register_task`): a new task is one new file here (or a module of your
own named in CNNKIT_TASKS). Each task module holds everything of its task: see `cnnkit.taskapi.Task`."""

import importlib
import pkgutil

from cnnkit.taskapi import Task, TaskData, get_task, task_names  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # classify, detect, segment, helpers
    importlib.import_module(f"{__name__}.{_module}")
