"""Built-in datasets (registered through the ``register_datasets``  hook)."""

from __future__ import annotations

from mtlbench import hookimpl


@hookimpl
def register_datasets(register):
    pass
