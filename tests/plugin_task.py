"""A task of the user's own, loaded by name: `CNNKIT_TASKS=tests.plugin_task cnnkit train count_items ...`
(tests/test_taskapi.py defines the task; importing this module registers it)."""

from cnnkit.taskapi import register_task
from tests.test_taskapi import CountTask

register_task(CountTask)
