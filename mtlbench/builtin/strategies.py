"""Built-in strategies (registered through the ``register_strategies``  hook)."""

from __future__ import annotations

from mtlbench import hookimpl


@hookimpl
def register_strategies(register):
    pass
