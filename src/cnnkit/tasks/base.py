"""The task interface lives in `cnnkit.taskapi` (below the engine); these names stay importable from here."""

from cnnkit.taskapi import (EvalState, PredictionWriter, ResultWriter, Task, TaskData, TaskOptions,  # noqa: F401
                            at_least_fp32, normalise, option)
