"""The built-in tasks: importing this package registers classify, detect and segment (in that order)
with `cnnkit.taskapi`. Each task module holds everything of its task: see `cnnkit.taskapi.Task`."""

from cnnkit.taskapi import Task, TaskData, get_task, task_names  # noqa: F401
from cnnkit.tasks import classify, detect, segment  # noqa: F401  (registration)
