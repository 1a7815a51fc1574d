"""Tasks: classify, detect, segment. Each owns its loss, metrics, post-processing and drawing."""

from cnnkit.errors import UsageError
from cnnkit.tasks.base import Task, TaskData

TASKS = ("classify", "detect", "segment")


def get_task(name: str) -> Task:
    if name == "classify":
        from cnnkit.tasks.classify import ClassifyTask
        return ClassifyTask()
    if name == "detect":
        from cnnkit.tasks.detect import DetectTask
        return DetectTask()
    if name == "segment":
        from cnnkit.tasks.segment import SegmentTask
        return SegmentTask()
    raise UsageError(f"unknown task {name!r}", fix=f"choose one of {', '.join(TASKS)}")
