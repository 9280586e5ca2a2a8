"""The training tasks by name: the one module that imports every built-in task (each registers
itself into ``bla.data.task.TASKS``, which imports none of them)."""

from __future__ import annotations

from . import regbench, synthetic, text  # noqa: F401  (their modules register them; text loads datasets lazily)
from .task import TASKS, Task


def task_named(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {tuple(TASKS)}") from None


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)
