"""Every task the package trains: CoLA (the default), the other GLUE tasks, and your own files.

    from distributed_tune.tasks import get_task
    task = get_task("sst2")                 # a run's configured task: cfg.task_spec
    data = task.read(cfg.data)              # TaskData: train, eval (by split), test, label names

Names are GLUE's as `datasets` spells them. Imports no torch. A new task: its module, one line in
TASKS below, and test data; a task with options of its own gets the config section of its name.
"""

from __future__ import annotations

from distributed_tune.errors import ConfigError
from distributed_tune.tasks import cola, custom, glue
from distributed_tune.tasks.base import DataSource, Example, Task, TaskData

TASKS: dict[str, Task] = {"cola": cola.TASK, **glue.TASKS, "custom": custom.TASK}
NAMES = tuple(TASKS)
# Config sections owned by a task: section name (the task's) -> its dataclass of keys.
SECTIONS: dict[str, type] = {name: t.options for name, t in TASKS.items() if t.options is not None}


def get_task(name: str) -> Task:
    """The task called `name`, with its section's defaults (a run's own: `Config.task_spec`)."""
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"task={name!r} is not a task ({', '.join(NAMES)}){hint}")
    return TASKS[name]


__all__ = ["TASKS", "NAMES", "SECTIONS", "DataSource", "Example", "Task", "TaskData", "get_task"]
