"""End to end: `mtlbench run` with the landmark_coords task, as a user runs it (slow)."""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))

# [tasks.*] replaces the default task table (segmentation + landmarks) as a whole;
# data.landmarks keeps its default of two landmarks, so points are (S, 2, 2).
CONFIG = """
[experiment]
name = "tiny-coords"
folds = 2

[data.phantom]
patients = 4
seed = 3

[preprocess]
slice_size = [32, 32]

[model]
widths = [4, 8, 16]

[tasks.segmentation]
params = { hd95 = false }          # HD95 on the original grid is the slow part of a tiny run
head_params = { width = 4, convs = 1 }

[tasks.landmark_coords]
head_params = { width = 4, convs = 1 }

[train]
epochs = 2
batch_size = 8
slices_per_epoch = 48
lr = 0.003

[strategies.single]
[strategies.joint]

[resources]
cpus_per_trial = 1
gpus_per_trial = 0
"""


@pytest.mark.slow
def test_run_with_landmark_coords(tmp_path):
    try:
        md.distribution("mtlbench-coords")
    except md.PackageNotFoundError:
        pytest.skip("mtlbench-coords is not installed (the CLI discovers it through its entry point)")
    cache = tmp_path / "cache"
    env = dict(os.environ, MTLBENCH_CACHE_DIR=str(cache), COLUMNS="200")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    r = subprocess.run([MTLBENCH, "run", str(cfg), "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    trials = json.loads((out / "results.json").read_text())["trials"]
    joint = [t for t in trials if t["strategy"] == "joint"]
    assert len(joint) == 2 and {t["status"] for t in joint} == {"completed"}
    for t in joint:
        value = t["metrics"]["landmark_coords/error_mm_mean"]
        assert isinstance(value, float) and math.isfinite(value) and value >= 0
        assert 0.0 <= t["metrics"]["landmark_coords/detect_10mm"] <= 1.0

    r = subprocess.run([MTLBENCH, "leaderboard", str(out), "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert any(row["strategy"] == "joint" for row in rows)

    import h5py

    files = sorted((cache / "slices").glob("*.h5"))
    assert files, f"no slice cache under {cache / 'slices'}"
    with h5py.File(files[0], "r") as f:
        pids = list(f["patients"])
        assert len(pids) == 4
        for pid in pids:
            s = f[f"patients/{pid}/image"].shape[0]
            assert f[f"patients/{pid}/targets/landmark_coords/points"].shape == (s, 2, 2)
            assert f[f"patients/{pid}/targets/landmark_coords/near"].shape == (s, 2)
            assert f[f"patients/{pid}/targets/landmark_coords/positions"].shape == (2, 3)
