"""Per-trial tracking: TensorBoard event files written during training, and MLflow through Ray Tune's callback.

The TensorBoard test trains a real tiny benchmark in-process and reads the
event files back with TensorBoard's own reader; the MLflow test runs ``mtlbench
run`` on Ray Tune into a real MLflow file store and reads it back with
``MlflowClient``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlbench import config as config_mod
from mtlbench.config import load_config, validate_config
from mtlbench.engine.tracking import TrialTracker, epoch_scalars, final_scalars, mlflow_key
from mtlbench.errors import ConfigError

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'mtlbench[tensorboard]')")
MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


# ----------------------------------------------------------------------------- config


def test_tensorboard_setting_values():
    assert validate_config({}).run.tensorboard == "auto"
    assert validate_config({"run": {"tensorboard": False}}).run.tensorboard is False
    for bad in (1, "yes", "true"):
        with pytest.raises(ConfigError, match=r'run\.tensorboard: must be true, false or "auto"'):
            validate_config({"run": {"tensorboard": bad}}, "b.toml")


def test_missing_packages_are_one_line_config_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod, "_installed", lambda package: False)
    cfg = tmp_path / "b.toml"
    cfg.write_text('[run]\ntensorboard = true\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and "run.tensorboard" in msg and "pip install 'mtlbench[tensorboard]'" in msg
    assert validate_config({"run": {"tensorboard": "auto"}}).run.tensorboard == "auto"  # auto: simply off
    cfg.write_text('[run.mlflow]\ntracking_uri = "file:./mlruns"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and "run.mlflow" in msg and "pip install 'mtlbench[mlflow]'" in msg
    assert validate_config({"run": {"mlflow": {"enabled": False}}}).run.mlflow.enabled is False


def test_mlflow_table_keys_are_checked():
    with pytest.raises(ConfigError, match=r"run\.mlflow\.tracking_uri"):
        validate_config({"run": {"mlflow": {"tracking": "file:x"}}})


# ----------------------------------------------------------------------------- scalars


def test_scalar_names():
    entry = {
        "epoch": 3, "lr": 1e-3, "time_s": 2.5,
        "train": {"loss/segmentation": 0.5, "weight/landmarks": 3.0, "task=landmarks": 4.0, "alpha": 0.1},
        "metrics": {"segmentation/iou_mean": 0.6, "landmarks/rmse": float("nan")},
    }
    tags = epoch_scalars(entry)
    assert tags["loss/segmentation"] == 0.5 and tags["weight/landmarks"] == 3.0
    assert tags["train/task=landmarks"] == 4.0 and tags["train/alpha"] == 0.1
    assert tags["lr"] == 1e-3 and tags["time/epoch_s"] == 2.5
    assert tags["eval/segmentation/iou_mean"] == 0.6 and math.isnan(tags["eval/landmarks/rmse"])
    assert "epoch" not in tags
    assert final_scalars({"segmentation/iou_mean": 0.7, "reference": {"x": 1}}) == {"final/segmentation/iou_mean": 0.7}
    assert mlflow_key("train/task=landmarks") == "train/task:landmarks"
    assert mlflow_key("loss/segmentation") == "loss/segmentation"


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = TrialTracker(tmp_path / "tb", enabled=False)
    tracker.epoch({"epoch": 1, "lr": 0.1, "train": {"loss/a": 1.0}})
    tracker.final({"a/b": 1.0})
    tracker.close()
    assert not tracker.enabled and not (tmp_path / "tb").exists()


@needs_tensorboard
def test_tracker_replaces_an_earlier_attempt(tmp_path):
    for value in (1.0, 2.0):  # a retried trial starts again at epoch 1: one series, the last attempt's
        with TrialTracker(tmp_path / "tb", enabled=True, info={"id": "t"}) as tracker:
            tracker.epoch({"epoch": 1, "lr": 0.1, "train": {"loss/a": value}})
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert _scalars(tmp_path / "tb")["loss/a"] == [(1, 2.0)]


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
@needs_tensorboard
def test_tensorboard_event_files_match_each_trials_history(tmp_path):
    from mtlbench.testing import run_tiny_benchmark

    # uncertainty weighting logs weight/, lambda/, s/ and sigma/ per task besides the losses and grad norms
    res = run_tiny_benchmark(tmp_path, tasks={"landmarks": {}}, strategies={"single": {}, "uncertainty": {}})
    assert len(res.trials) == 4 and all(t["status"] == "completed" for t in res.trials)
    for trial in res.trials:
        trial_dir = res.run_dir / trial["dir"]
        record = json.loads((trial_dir / "result.json").read_text())
        tb = trial_dir / "tensorboard"
        assert tb.parent == res.run_dir / "trials" / trial["id"] and list(tb.glob("events.out.tfevents.*"))
        got = _scalars(tb)
        history = record["history"]
        assert len(history) == 2
        tasks = ["segmentation"] if trial["strategy"] == "single" else ["segmentation", "landmarks"]
        for task in tasks:
            assert f"loss/{task}" in got, sorted(got)
        for entry in history:
            for key, value in entry["train"].items():  # every train entry: losses, weights, grad norms
                tag = key if "/" in key else f"train/{key}"
                steps = dict(got[tag])
                assert _close(steps[entry["epoch"]], value), (trial["id"], tag)
            assert _close(dict(got["lr"])[entry["epoch"]], entry["lr"])
            for key, value in entry.get("metrics", {}).items():
                assert _close(dict(got[f"eval/{key}"])[entry["epoch"]], value), (trial["id"], key)
        assert [s for s, _ in got["loss/segmentation"]] == [1, 2]
        if trial["strategy"] == "uncertainty":
            for tag in ("weight/landmarks", "lambda/landmarks", "lambda/segmentation", "grad_norm/landmarks"):
                assert tag in got, (tag, sorted(got))
        for key, value in record["metrics"].items():
            assert got[f"final/{key}"] == [(2, pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True))], key
        assert "final/segmentation/iou_mean" in got


# ----------------------------------------------------------------------------- MLflow through Ray Tune

def _mlflow_toml() -> str:
    """The tiny benchmark (mtlbench.testing) with landmarks, single + joint, logging to a local MLflow store."""
    import tomli_w

    from mtlbench.testing import tiny_config

    mlflow = {"tracking_uri": "file:./mlruns", "experiment_name": "tiny-mlflow", "tags": {"project": "unit"}}
    return tomli_w.dumps(tiny_config(tasks={"landmarks": {}}, overrides={"run": {"mlflow": mlflow}}))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'mtlbench[mlflow]')")
def test_mlflow_gets_one_run_per_trial_with_its_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "tiny.toml").write_text(_mlflow_toml())
    env = dict(os.environ, MTLBENCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([MTLBENCH, "run", "tiny.toml", "--out", "run", "--no-report"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = json.loads((tmp_path / "run" / "results.json").read_text())["trials"]
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials)

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    uri = (tmp_path / "mlruns").resolve().as_uri()  # "file:./mlruns" relative to where `run` was started
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny-mlflow")
    assert exp is not None
    runs = {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(t["id"] for t in trials)
    for trial in trials:
        run = runs[trial["id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["project"] == "unit"
        assert run.data.params["trial/strategy"] == trial["strategy"]
        assert run.data.params["trial/fold"] == str(trial["fold"])
        for key, value in trial["metrics"].items():
            assert run.data.metrics[f"final/{key}"] == pytest.approx(value, rel=1e-6, nan_ok=True), key
        for tag in ("loss/segmentation", "lr", "eval/segmentation/iou_mean"):
            history = client.get_metric_history(run.info.run_id, tag)
            by_step = {m.step: m.value for m in history}
            for entry in trial["history"]:
                want = entry["lr"] if tag == "lr" else (
                    entry["train"]["loss/segmentation"] if tag.startswith("loss") else entry["metrics"]["segmentation/iou_mean"])
                assert by_step[entry["epoch"]] == pytest.approx(want, rel=1e-6), (trial["id"], tag)
        if trial["strategy"] == "joint":
            assert "loss/landmarks" in run.data.metrics and "weight/landmarks" in run.data.metrics
