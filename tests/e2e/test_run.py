"""End to end through real Ray Tune: `mtlbench run`, failures, divergence, interrupt and resume.

One tiny benchmark (4 phantom patients, 32 x 32 slices, 2 folds) runs as a
subprocess exactly as a user would run it; a test-only plugin distribution
(tests/plugins/mtlbench-faulty) is pip-installed into a temporary folder to add
a strategy that raises and one that diverges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))

CONFIG = """
[experiment]
name = "tiny"
folds = 2

[data.phantom]
patients = 4
seed = 3

[preprocess]
slice_size = [32, 32]

[model]
widths = [4, 8, 16]

[tasks.segmentation]
head_params = { width = 4, convs = 1 }

[tasks.landmarks]
head_params = { width = 4, convs = 1 }

[train]
epochs = 2
batch_size = 8
slices_per_epoch = 48
lr = 0.003

[strategies.single]
[strategies.joint]
grid = { "weights.landmarks" = [1.0, 3.0] }

[resources]
cpus_per_trial = 1
gpus_per_trial = 0

[run]
max_failures = 1
"""

FAULTY = """
[strategies.broken]
use = "explode"
[strategies.nan]
use = "diverge"
[strategies.crash]
use = "crash_once"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(ROOT / "tests" / "plugins" / "mtlbench-faulty")],
        check=True, capture_output=True,
    )
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, PYTHONPATH=str(site), MTLBENCH_CACHE_DIR=str(cache), COLUMNS="200")


def _mtlbench(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MTLBENCH, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory, env) -> Path:
    d = tmp_path_factory.mktemp("e2e")
    cfg = d / "tiny.toml"
    cfg.write_text(CONFIG + FAULTY)
    out = d / "run"
    # crash_once SIGKILLs one worker once: with run.max_failures = 1 Tune retries that trial
    r = _mtlbench(["run", str(cfg), "--out", str(out)], dict(env, MTLBENCH_TEST_CRASH_MARKER=str(d / "crashed")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (d / "stdout.txt").write_text(r.stdout)
    (d / "stderr.txt").write_text(r.stderr)
    return out


def test_results_json(run):
    res = json.loads((run / "results.json").read_text())
    trials = res["trials"]
    # (single + joint x 2 lambdas + broken + nan + crash) x 2 folds
    assert len(trials) == 12
    by = {}
    for t in trials:
        by.setdefault(t["strategy"], []).append(t)
        for key in ("id", "dir", "fold", "strategy", "params", "seed", "status", "error", "metrics", "per_patient", "history",
                    "wall_time_s", "peak_memory_mb"):
            assert key in t, key
    assert {t["status"] for t in by["single"] + by["joint"]} == {"completed"}
    assert {t["status"] for t in by["broken"]} == {"failed"}
    assert all("explode strategy failed on purpose" in t["error"] for t in by["broken"])
    assert {t["status"] for t in by["nan"]} == {"diverged"}
    # a worker SIGKILLed mid-trial (run.max_failures = 1): retried, completed
    assert (run.parent / "crashed").exists() and {t["status"] for t in by["crash"]} == {"completed"}
    for t in by["single"]:
        assert 0.0 <= t["metrics"]["segmentation/iou_mean"] <= 1.0
        assert len(t["per_patient"]) == 2 and all("patient" in p for p in t["per_patient"])
        assert len(t["history"]) == 2
        assert "segmentation/hd95_mean" in t["metrics"]
        assert not Path(t["dir"]).is_absolute()
        assert (run / t["dir"] / "result.json").is_file() and (run / t["dir"] / "checkpoint.pt").is_file()
    for t in by["joint"]:
        assert "landmarks/rmse" in t["metrics"] and "landmarks/error_mm_mean" in t["metrics"]
    # every patient is tested exactly once per strategy setting
    tested = sorted(p["patient"] for t in by["single"] for p in t["per_patient"])
    assert tested == sorted(set(tested)) and len(tested) == 4
    assert (run / "config.toml").is_file() and (run / "splits.json").is_file()
    assert res["meta"]["main_metric"] == "segmentation/iou_mean"


def test_leaderboard_json(run, env):
    r = _mtlbench(["leaderboard", str(run), "--json"], env)
    assert r.returncode == 0, r.stderr
    board = json.loads(r.stdout)
    rows = board["rows"]
    assert len(rows) == 6
    base = [row for row in rows if row["is_baseline"]]
    assert len(base) == 1 and base[0]["strategy"] == "single"
    broken = next(row for row in rows if row["strategy"] == "broken")
    assert broken["failed"] == 2 and broken["completed"] == 0
    nan = next(row for row in rows if row["strategy"] == "nan")
    assert nan["diverged"] == 2
    joint = [row for row in rows if row["strategy"] == "joint"]
    # the deciding test pairs the 2 folds; the patient-level reference pairs the 4 test patients
    assert len(joint) == 2 and all(row["vs_baseline"]["n"] == 2 and row["vs_baseline"]["unit"] == "fold x seed" for row in joint)
    assert all(row["vs_baseline"]["patient_level"]["n"] == 4 for row in joint)


def test_plots_and_report(run, env):
    plots = sorted((run / "plots").glob("*.png"))
    assert plots, "no plots written"
    assert all(p.stat().st_size > 1000 for p in plots)
    report = (run / "report.md").read_text()
    assert "![" in report and "plots/" in report


def test_terminal_output(run):
    """The leaderboard on stdout, and not one line from Ray on the terminal: Ray's messages go to ray.log."""
    import re

    text = (run.parent / "stdout.txt").read_text()
    assert "single" in text and "baseline" in text
    assert (run / "ray.log").is_file()
    err = (run.parent / "stderr.txt").read_text()
    for line in (text + "\n" + err).splitlines():
        # the one exception: this run SIGKILLs a worker on purpose (crash_once), and Ray's driver reports
        # a dead worker itself; a run whose workers all live prints nothing of Ray's
        if "(raylet)" in line and "A worker died or was killed" in line:
            continue
        assert not re.search(r"Failed to fetch|\(raylet\)|\(pid=|WARNING|INFO |Traceback|Tune", line), line
    assert all(not l.strip() or l.startswith(("warning:", "No GPU found")) for l in err.splitlines()), err


def test_predict_from_run_trial(run, env, tmp_path):
    trial = next(run / t["dir"] for t in json.loads((run / "results.json").read_text())["trials"]
                 if t["strategy"] == "joint" and t["status"] == "completed")
    r = _mtlbench(["predict", str(trial), "--out", str(tmp_path / "pred")], env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.suffix for p in (tmp_path / "pred").iterdir()) == [".fcsv", ".fcsv", ".gz", ".gz"]


def test_interrupt_and_resume(tmp_path, env):
    """Ctrl-C mid-run leaves finished trials alone; --resume runs only the rest.

    Deterministic: the ``hold`` trials (last in the grid) block until a release
    file exists, so the run is still going when the interrupt arrives, however
    fast the other trials are.
    """
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG.replace("epochs = 2", "epochs = 3") + '[strategies.hold]\nuse = "hold"\n')
    out = tmp_path / "run"
    release = tmp_path / "release"
    env = dict(env, MTLBENCH_TEST_RELEASE=str(release))
    proc = subprocess.Popen([MTLBENCH, "run", str(cfg), "--out", str(out)], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            done = list(out.glob("trials/*/result.json"))
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended although its hold trials cannot finish"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert 2 <= len(before) <= 6 and not any(name.startswith("hold") for name in before)
    assert not (out / "results.json").exists()  # an interrupted run writes no results
    release.touch()
    r = _mtlbench(["run", str(cfg), "--out", str(out), "--resume"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    for name, mtime in before.items():
        assert after[name] == mtime, f"finished trial {name} was rerun"
    res = json.loads((out / "results.json").read_text())
    ids = [t["id"] for t in res["trials"]]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert all(t["status"] == "completed" for t in res["trials"])


# ----------------------------------------------------------------------------- faults, each an event, never a race


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc is None or proc.poll() is None, "the run ended before the event the test waits for"
        time.sleep(0.3)
    raise AssertionError("timed out waiting for the run")


def _results(out: Path) -> dict[str, dict]:
    return {t["id"]: t for t in json.loads((out / "results.json").read_text())["trials"]}


CRASH = CONFIG.replace('[strategies.joint]\ngrid = { "weights.landmarks" = [1.0, 3.0] }\n',
                       '[strategies.crash]\nuse = "crash_once"\n')


@pytest.mark.parametrize("retries", [0])  # with retries (1): the module's run, test_results_json
def test_worker_sigkill(tmp_path, env, retries):
    """A trial whose worker process is SIGKILLed is recorded as failed without retries (run.max_failures = 0);
    the run completes and accounts for every trial."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CRASH.replace("max_failures = 1", f"max_failures = {retries}"))
    marker = tmp_path / "crashed"
    out = tmp_path / "run"
    r = _mtlbench(["run", str(cfg), "--out", str(out)], dict(env, MTLBENCH_TEST_CRASH_MARKER=str(marker)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert marker.exists()  # a worker really died
    trials = _results(out)
    assert len(trials) == 4
    status = sorted(t["status"] for t in trials.values())
    if retries:
        assert status == ["completed"] * 4
    else:
        assert status == ["completed"] * 3 + ["failed"]
        failed = next(t for t in trials.values() if t["status"] == "failed")
        assert failed["strategy"] == "crash" and failed["error"]


def test_driver_sigkill_then_resume(tmp_path, env):
    """SIGKILL of the driver and its Ray processes mid-run loses no finished trial; --resume finishes the
    run, and a trial that ran after the resume equals its twin that ran before it (same seed, same data)."""
    cfg = tmp_path / "tiny.toml"
    # hold trains exactly like joint with weight 1, but only once the release file exists
    cfg.write_text(CONFIG.replace('[1.0, 3.0]', '[1.0]') + '[strategies.hold]\nuse = "hold"\n')
    out = tmp_path / "run"
    release = tmp_path / "release"
    env = dict(env, MTLBENCH_TEST_RELEASE=str(release))
    proc = subprocess.Popen([MTLBENCH, "run", str(cfg), "--out", str(out)], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: len(list(out.glob("trials/joint*/result.json"))) == 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert not any(n.startswith("hold") for n in before) and not (out / "results.json").exists()
    release.touch()
    r = _mtlbench(["run", "--resume", "--out", str(out)], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert all(after[n] == m for n, m in before.items()), "a finished trial was rerun"
    trials = _results(out)
    assert len(trials) == 6 and all(t["status"] == "completed" for t in trials.values())
    for fold in (0, 1):
        joint = next(t for t in trials.values() if t["strategy"] == "joint" and t["fold"] == fold)
        hold = next(t for t in trials.values() if t["strategy"] == "hold" and t["fold"] == fold)
        assert hold["metrics"] == joint["metrics"], f"fold {fold}: same seed, different results"


def test_two_node_cluster_survives_losing_a_node(tmp_path, env, monkeypatch):
    """A Ray cluster of two nodes on loopback addresses; the worker node is stopped while a trial runs on it.
    The run completes (the lost trial is retried on the head node) and accounts for every trial."""
    from ray.cluster_utils import Cluster

    # Ray turns 127.0.0.1 into the machine's address unless told this is a one-machine cluster:
    # then nodes, driver and workers all stay on loopback.
    release = tmp_path / "release"
    run_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MTLBENCH_TEST_RELEASE=str(release))
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MTLBENCH_TEST_RELEASE", "PYTHONPATH", "MTLBENCH_CACHE_DIR"):
        monkeypatch.setenv(key, run_env[key])  # the nodes' workers inherit them: the test plugin, the release file
    # a lost node is noticed within about a second, not after Ray's default 30 s of missed heartbeats
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "_system_config": system})
    try:
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cfg = tmp_path / "tiny.toml"
        cfg.write_text(CONFIG.replace('[strategies.joint]\ngrid = { "weights.landmarks" = [1.0, 3.0] }\n',
                                      '[strategies.hold]\nuse = "hold"\n'))
        out = tmp_path / "run"
        proc = subprocess.Popen([MTLBENCH, "run", str(cfg), "--out", str(out), "--address", cluster.address],
                                env=run_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # both hold trials run (one per node) once both single trials are done: then stop the worker node
            _wait_for(lambda: len(list(out.glob("trials/single*/result.json"))) == 2, proc)
            _wait_for(lambda: len(list(out.glob("trials/hold*"))) == 2, proc)
            time.sleep(2.0)
            cluster.remove_node(worker, allow_graceful=False)
            release.touch()
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        trials = _results(out)
        assert len(trials) == 4 and sorted(t["strategy"] for t in trials.values()) == ["hold", "hold", "single", "single"]
        assert all(t["status"] == "completed" for t in trials.values()), {i: t["status"] for i, t in trials.items()}
    finally:
        cluster.shutdown()
