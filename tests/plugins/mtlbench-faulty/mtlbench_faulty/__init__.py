"""Test-only strategies that fail the ways real ones do: one raises, one diverges, one kills its own
worker process once; and one that waits.

Installed by tests/e2e to check that a run with broken trials completes and
records them as ``failed`` and ``diverged``, and that an interrupted run
resumes: ``hold`` trains jointly but blocks in its first step until the file
named by ``MTLBENCH_TEST_RELEASE`` exists, so a run cannot finish before the
test interrupts it. ``crash_once`` SIGKILLs its worker in its first step, once
per file named by ``MTLBENCH_TEST_CRASH_MARKER`` (created atomically, so of
several concurrent trials exactly one dies); afterwards it trains jointly.
"""

from __future__ import annotations

import os
import signal
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


class CrashOnce(Strategy):
    name = "crash_once"
    description = "SIGKILLs its worker once (the first step to create MTLBENCH_TEST_CRASH_MARKER), then joint (test only)"

    def backward(self, losses, ctx):
        marker = os.environ.get("MTLBENCH_TEST_CRASH_MARKER")
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        sum(losses.values()).backward()
        return {}


@hookimpl
def register_strategies(register):
    register(Explode)
    register(Diverge)
    register(Hold)
    register(CrashOnce)
