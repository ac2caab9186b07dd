"""The command line through typer's CliRunner, and the import cost of --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mtlbench import __version__
from mtlbench.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"mtlbench {__version__}"


def test_plugins_json_lists_every_kind():
    r = runner.invoke(app, ["plugins", "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert set(data) == {"tasks", "heads", "strategies", "datasets"}
    names = {k: {i["name"] for i in v} for k, v in data.items()}
    assert {"segmentation", "landmarks"} <= names["tasks"]
    assert {"single", "joint", "alternate", "uncertainty"} <= names["strategies"]
    assert {"manifest", "visceral", "phantom"} <= names["datasets"]
    assert "conv" in names["heads"]


def test_plugins_table():
    r = runner.invoke(app, ["plugins"])
    assert r.exit_code == 0 and "segmentation" in r.stdout


def test_config_show_resolves_profile_and_set(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('[train]\nepochs = 3\n[profiles.fast]\ntrain = { epochs = 1 }\n')
    r = runner.invoke(app, ["config", "show", str(p), "--profile", "fast", "--set", "train.batch_size=3"])
    assert r.exit_code == 0, r.output
    assert "epochs = 1" in r.stdout and "batch_size = 3" in r.stdout and 'profile = "fast"' in r.stdout


def test_config_error_exit_2_one_line(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text("[train]\nepoch = 3\n")
    r = runner.invoke(app, ["config", "show", str(p)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "did you mean 'train.epochs'" in lines[0]
    assert "Traceback" not in r.output


def test_kidney_benchmark_config_is_valid():
    r = runner.invoke(app, ["config", "show", str(ROOT / "benchmarks" / "kidney.toml")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["config", "show", str(ROOT / "benchmarks" / "kidney.toml"), "--profile", "cpu"])
    assert r.exit_code == 0, r.output


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import sys\n"
        "from mtlbench.cli import main\n"
        "sys.argv = ['mtlbench', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'ray', 'SimpleITK', 'h5py') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr
    code = code.replace("'--help'", "'plugins', '--json'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr
    if not Path("/dev/nvidia0").exists():  # config show checks for a GPU, which needs torch only on a GPU machine
        kidney = str(ROOT / "benchmarks" / "kidney.toml")
        r = subprocess.run([sys.executable, "-c", code.replace("'plugins', '--json'", f"'config', 'show', {kidney!r}")],
                           capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in r.stdout and 'profile = "cpu"' in r.stdout, r.stdout + r.stderr


def test_resume_accepts_its_own_command_line_and_refuses_changes(tmp_path):
    from mtlbench.config import load_config, to_toml

    p = tmp_path / "b.toml"
    p.write_text("[train]\nepochs = 3\n")
    run = tmp_path / "r"
    r = runner.invoke(app, ["run", str(p), "--out", str(run), "--resume"])
    assert r.exit_code == 2 and "is not a run folder" in r.stderr
    run.mkdir()
    (run / "config.toml").write_text(to_toml(load_config(p, None, ["train.epochs=2"])))
    r = runner.invoke(app, ["run", str(p), "--out", str(run), "--resume"])  # epochs 3 vs the recorded 2
    assert r.exit_code == 2 and "first difference: train.epochs" in r.stderr, r.stderr
    r = runner.invoke(app, ["run", "--out", str(run), "--resume", "--set", "train.epochs=1"])
    assert r.exit_code == 2 and "--set need the CONFIG" in r.stderr
    r = runner.invoke(app, ["run", str(p), "--resume"])
    assert r.exit_code == 2 and "--out" in r.stderr
    r = runner.invoke(app, ["run"])
    assert r.exit_code == 2 and "needs a benchmark CONFIG" in r.stderr


def test_help_keeps_words_in_square_brackets():
    """rich markup would swallow "[profiles.NAME]" and "[strategies]" from option help."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("mtlbench"))
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "200"})
    assert "[profiles.NAME]" in out.stdout and "[strategies]" in out.stdout
