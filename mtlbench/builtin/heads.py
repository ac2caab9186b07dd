"""Built-in heads (registered through the ``register_heads``  hook)."""

from __future__ import annotations

from mtlbench import hookimpl


@hookimpl
def register_heads(register):
    pass
