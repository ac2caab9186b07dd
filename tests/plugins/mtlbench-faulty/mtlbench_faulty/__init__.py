"""Test-only strategies that fail the ways real ones do: one raises, one diverges.

Installed by tests/e2e to check that a run with broken trials completes and
records them as ``failed`` and ``diverged``.
"""

from __future__ import annotations

from mtlbench import hookimpl
from mtlbench.api import Strategy


class Explode(Strategy):
    name = "explode"
    description = "raises in its first backward (test only)"

    def backward(self, losses, ctx):
        raise RuntimeError("explode strategy failed on purpose")


class Diverge(Strategy):
    name = "diverge"
    description = "drives the weights to NaN (test only)"

    def backward(self, losses, ctx):
        total = sum(losses.values())
        (total * float("nan")).backward()
        return {}


@hookimpl
def register_strategies(register):
    register(Explode)
    register(Diverge)
