"""A run that fails before its first trial leaves nothing in the way of the fixed command."""

from __future__ import annotations

from pathlib import Path

import tomli_w
from rich.console import Console
from typer.testing import CliRunner

from mtlbench.cli import app
from mtlbench.config import load_config
from mtlbench.orchestrate.runner import run_experiment
from mtlbench.testing import tiny_config

runner = CliRunner()


def _config(tmp_path: Path, **experiment) -> Path:
    raw = tiny_config(strategies={"single": {}}, overrides={"experiment": experiment, "train": {"epochs": 1}})
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def test_a_start_that_fails_removes_the_folder_it_created(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", str(_config(tmp_path, main_metric="nope")), "--out", str(out)])
    assert r.exit_code == 2 and "experiment.main_metric" in r.stderr and "Traceback" not in r.output
    assert not out.exists()


def test_a_start_that_fails_keeps_what_was_already_in_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["run", str(_config(tmp_path, main_metric="nope")), "--out", str(out)])
    assert r.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_killed_start_is_taken_over_by_the_same_command(tmp_path, monkeypatch):
    """A SIGKILLed start cannot clean up: what it left (config, splits, an empty trial folder) is taken over."""
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    (out / "trials" / "single-default-f0-s0").mkdir(parents=True)
    (out / "config.toml").write_text("[experiment]\nname = 'other'\n")
    (out / "splits.json").write_text("{}")
    cfg = load_config(_config(tmp_path))
    done = run_experiment(cfg, out, console=Console(quiet=True), local=True)
    assert [t["status"] for t in done["trials"]] == ["completed", "completed"]
    assert load_config(out / "config.toml").experiment.name == "tiny"
    # A folder with a finished trial is a run: the same command is refused, --resume continues it.
    r = runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(out)])
    assert r.exit_code == 2 and "already holds a run" in r.stderr


def test_a_slice_size_the_model_cannot_take_stops_run_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(out), "--set", "preprocess.slice_size=[30, 30]"])
    assert r.exit_code == 2 and "preprocess.slice_size 30x30 must be divisible by 4" in r.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()
