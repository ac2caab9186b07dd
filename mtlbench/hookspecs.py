"""The hook specifications: the whole contract between mtlbench and a plugin.

A plugin is a module named by an entry point in the ``mtlbench`` group. It
implements any of these hooks with ``@mtlbench.hookimpl``. Each ``register_*``
hook receives a ``register`` callback; the plugin calls it once per class it
provides (a subclass of ``mtlbench.api.Task``, ``Head``, ``Strategy`` or
``DatasetSource`` with a unique ``name``).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("mtlbench")
hookimpl = pluggy.HookimplMarker("mtlbench")


@hookspec
def register_tasks(register: Callable[[type], None]) -> None:
    """Register task classes (subclasses of ``mtlbench.api.Task``)."""


@hookspec
def register_heads(register: Callable[[type], None]) -> None:
    """Register head classes (subclasses of ``mtlbench.api.Head``)."""


@hookspec
def register_strategies(register: Callable[[type], None]) -> None:
    """Register strategy classes (subclasses of ``mtlbench.api.Strategy``)."""


@hookspec
def register_datasets(register: Callable[[type], None]) -> None:
    """Register dataset source classes (subclasses of ``mtlbench.api.DatasetSource``)."""


@hookspec
def register_commands(app: Any) -> None:
    """Add sub-commands to the ``mtlbench`` typer app (``app.command()(fn)``)."""
