"""Test-only strategies that fail the ways real ones do: one raises, one diverges; and one that waits.

Installed by tests/e2e to check that a run with broken trials completes and
records them as ``failed`` and ``diverged``, and that an interrupted run
resumes: ``hold`` trains jointly but blocks in its first step until the file
named by ``MTLBENCH_TEST_RELEASE`` exists, so a run cannot finish before the
test interrupts it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


class Hold(Strategy):
    name = "hold"
    description = "joint training that waits for MTLBENCH_TEST_RELEASE to exist (test only)"

    def backward(self, losses, ctx):
        release = Path(os.environ.get("MTLBENCH_TEST_RELEASE", "/nonexistent/release"))
        while not release.exists():
            time.sleep(0.2)
        sum(losses.values()).backward()
        return {}


@hookimpl
def register_strategies(register):
    register(Explode)
    register(Diverge)
    register(Hold)
