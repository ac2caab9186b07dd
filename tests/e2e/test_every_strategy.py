"""Every installed strategy completes a tiny benchmark through real Ray Tune and gets a leaderboard row.

The strategies are read from the plugin registry (built-ins, mtlbench-torchjd
when installed), each at its default parameters; one that cannot be built
(an aggregator whose pip extra is missing) must say so in one line and is
left out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))

BASE = """
[experiment]
name = "every-strategy"
folds = 2

[data.phantom]
patients = 4
seed = 3

[preprocess]
slice_size = [32, 32]

[model]
widths = [4, 8, 16]

[tasks.segmentation]
params = { hd95 = false }
head_params = { width = 4, convs = 1 }

[tasks.landmarks]
head_params = { width = 4, convs = 1 }

[train]
epochs = 2
batch_size = 8
slices_per_epoch = 16
lr = 0.003

[resources]
cpus_per_trial = 1
gpus_per_trial = 0
"""


#: Parameters for the strategies that have required ones (torchjd's; the rest run at their defaults).
REQUIRED = {
    "jd_cagrad": {"c": 0.4},
    "jd_fairgrad": {"alpha": 1.0},
    "jd_constant": {"weights": [1.0, 1.0]},
    "jd_trimmedmean": {"trim_number": 0},
}


def buildable_strategies() -> tuple[list[str], dict[str, str]]:
    from mtlbench.assemble import make_strategy
    from mtlbench.config import validate_config
    from mtlbench.errors import MtlbenchError
    from mtlbench.plugins import new_manager

    manager = new_manager()
    names, skipped = [], {}
    for name in manager.registry("strategies").names():
        cfg = validate_config({"strategies": {"single": {}, "s": {"use": name}}})
        try:
            make_strategy(cfg, "s", REQUIRED.get(name, {}), manager)
        except MtlbenchError as exc:
            skipped[name] = str(exc)
            continue
        names.append(name)
    return names, skipped


@pytest.mark.slow
def test_every_strategy_runs(tmp_path):
    names, skipped = buildable_strategies()
    for name, why in skipped.items():
        assert "\n" not in why and why, name  # a one-line reason
    assert len(names) >= 11
    if any(n.startswith("jd_") for n in names):  # mtlbench-torchjd installed, as make installs it
        assert len(names) + len(skipped) >= 25
    cfg = tmp_path / "every.toml"
    tables = []
    for n in names:
        params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in REQUIRED.get(n, {}).items())
        tables.append(f'\n[strategies.{n}]\nuse = "{n}"\n' + (f"params = {{ {params} }}\n" if params else ""))
    cfg.write_text(BASE + "".join(tables))
    env = dict(os.environ, MTLBENCH_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200")
    out = tmp_path / "run"
    r = subprocess.run([MTLBENCH, "run", str(cfg), "--out", str(out), "--no-report"], capture_output=True, text=True,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    board = json.loads(subprocess.run([MTLBENCH, "leaderboard", str(out), "--json"], capture_output=True, text=True,
                                      env=env, check=True).stdout)
    rows = {row["strategy"]: row for row in board["rows"]}
    assert set(rows) == set(names)
    broken = {n: (row["completed"], row["failed"], row["diverged"]) for n, row in rows.items() if row["completed"] != 2}
    assert broken == {}, broken
    assert not (out / "report.md").exists()  # --no-report
