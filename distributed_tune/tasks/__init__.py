"""Every task the package trains: CoLA (the default), the other GLUE tasks, and your own files.

    from distributed_tune.tasks import get_task
    task = get_task("sst2")                 # or get_task(cfg.task, regression=cfg.data.regression)
    data = task.read(cfg.data)              # TaskData: train, eval (by split), test, label names

Names are GLUE's as `datasets` spells them. Imports no torch.
"""

from __future__ import annotations

from distributed_tune.errors import ConfigError
from distributed_tune.tasks import cola, custom, glue
from distributed_tune.tasks.base import Example, Task, TaskData

TASKS: dict[str, Task] = {"cola": cola.TASK, **glue.TASKS}
NAMES = (*TASKS, "custom")


def get_task(name: str, regression: bool = False) -> Task:
    """The task called `name`; `regression` applies to `custom` (GLUE tasks fix their own)."""
    if name == "custom":
        return custom.custom_task(regression)
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"task={name!r} is not a task ({', '.join(NAMES)}){hint}")
    return TASKS[name]


__all__ = ["TASKS", "NAMES", "Example", "Task", "TaskData", "get_task"]
