"""The plugin author's tutorial (docs/plugins.md, section 1) works as written.

Its three files are extracted from the page, pip-installed into a temporary
folder as a third party would install them, and run: the benchmark TOML through
`mtlbench run` on real Ray Tune, and the tutorial's own test (which uses
mtlbench.testing.run_tiny_benchmark) with pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))
FENCE = re.compile(r"```(?:python|toml)\n# (?P<path>[\w./-]+)\n(?P<body>.*?)```", re.S)


def tutorial_files() -> dict[str, str]:
    """{relative path: text} of every fenced block whose first line names its file."""
    return {m["path"]: f"# {m['path']}\n{m['body']}" for m in FENCE.finditer(DOC.read_text())}


def test_the_tutorial_names_its_files():
    assert set(tutorial_files()) == {
        "mtlbench-body/pyproject.toml",
        "mtlbench-body/mtlbench_body/__init__.py",
        "mtlbench-body/tests/test_body.py",
        "body.toml",
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("tutorial")
    for rel, text in tutorial_files().items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(work / "mtlbench-body")],
        check=True, capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(site), MTLBENCH_CACHE_DIR=str(work / "cache"), COLUMNS="200")
    return work, env


@pytest.mark.slow
def test_tutorial_benchmark_runs_through_ray(installed):
    work, env = installed
    r = subprocess.run([MTLBENCH, "plugins", "--json"], capture_output=True, text=True, env=env)
    body = [t for t in json.loads(r.stdout)["tasks"] if t["name"] == "body"]
    assert body and body[0]["distribution"] == "mtlbench-body"

    out = work / "runs" / "body"
    r = subprocess.run([MTLBENCH, "run", str(work / "body.toml"), "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    joint = [t for t in res["trials"] if t["strategy"] == "joint"]
    assert len(joint) == 4 and all(t["status"] == "completed" for t in joint)
    assert all(0.0 <= t["metrics"]["body/dice"] <= 1.0 for t in joint)
    board = json.loads(subprocess.run([MTLBENCH, "leaderboard", str(out), "--json"], capture_output=True, text=True,
                                      env=env, check=True).stdout)
    assert {row["aux"]["metric"] for row in board["rows"] if row["strategy"] == "joint"} == {"body/dice"}
    cache = Path(joint[0]["cache"])
    with h5py.File(cache, "r", locking=False) as f:
        pid = json.loads(f.attrs["patients"])[0]
        ds = f[f"patients/{pid}/targets/body/body"]
        s = f[f"patients/{pid}/image"].shape[0]
        assert ds.shape == (s, 1, 32, 32) and ds.dtype == "uint8"
        assert 0 < ds[...].mean() < 1  # some body, some air
    pictures = [p for p in (out / "plots").glob("overlay_*joint*.png")]
    assert pictures


@pytest.mark.slow
def test_tutorial_own_test_passes(installed):
    work, env = installed
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work / "mtlbench-body" / "tests")],
                       capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 passed" in r.stdout
