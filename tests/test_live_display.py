"""The run's live display: a bar of trial-epochs, an estimate after the first epoch, a clock that moves."""

from __future__ import annotations

import types
from dataclasses import asdict

from rich.console import Console

from mtlbench.engine.trialspec import TrialSpec
from mtlbench.orchestrate.runner import _LiveDisplayMixin


def _trial(fold: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(config={"trial": asdict(TrialSpec(fold=fold, strategy="single", params={}, seed=0))})


def test_estimate_comes_from_epochs_not_finished_trials(monkeypatch):
    import mtlbench.orchestrate.runner as runner

    now = [1000.0]
    monkeypatch.setattr(runner.time, "time", lambda: now[0])
    specs = [TrialSpec(fold=f, strategy="single", params={}, seed=0) for f in range(4)]
    display = _LiveDisplayMixin(specs, epochs=10, concurrency=2, console=Console(record=True, width=100))
    assert display.remaining() is None and "remaining ~?" in display.summary()
    a, b = _trial(0), _trial(1)
    display.on_trial_start(0, [], a)
    display.on_trial_start(0, [], b)
    now[0] += 20.0
    display.on_trial_result(0, [], a, {"epoch": 2, "main_metric": 0.5})
    display.on_trial_result(0, [], b, {"epoch": 2, "main_metric": 0.4})
    # 4 of 40 trial-epochs in 20 s: 36 left at 0.2 per s -> 180 s, before any trial has finished
    assert display.epochs_done() == 4 and display.remaining() == 180.0
    assert "remaining ~3:00" in display.summary()
    now[0] += 5.0  # no event: the clock still moves (Live re-renders through get_renderable)
    assert "elapsed 0:25" in display.summary()
    display.on_trial_complete(0, [], a)
    assert display.epochs_done() == 12
    console = Console(record=True, width=100)
    console.print(display.render())
    out = console.export_text()
    assert "30%" in out and "single-default-f1-s0" in out and "2/10" in out
