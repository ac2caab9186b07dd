"""Built-in tasks (registered through the ``register_tasks``  hook)."""

from __future__ import annotations

from mtlbench import hookimpl


@hookimpl
def register_tasks(register):
    pass
