"""The plugin manager: registration, provenance, duplicates, broken entry points, the allowlist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from mtlbench import hookimpl
from mtlbench.api import Strategy, Task
from mtlbench.errors import PluginError
from mtlbench.plugins import new_manager

ROOT = Path(__file__).resolve().parents[1]
MTLBENCH = str(Path(sys.executable).with_name("mtlbench"))


class _ToyTask(Task):
    name = "toy_task"
    description = "a task defined by the test"
    kind = "regression"


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def test_builtins_register_through_entry_points(monkeypatch):
    monkeypatch.setenv("MTLBENCH_LOAD_PLUGINS", "")  # only mtlbench's own (other plugins may be installed)
    m = new_manager()
    data = m.as_json()
    assert set(data) == {"tasks", "heads", "strategies", "datasets"}
    for kind, items in data.items():
        for item in items:
            assert item["distribution"] == "mtlbench", item
            assert set(item) >= {"name", "plugin", "distribution", "version"}


def test_extra_plugin_registers_with_provenance():
    plugin = _plugin(register_tasks=lambda register: register(_ToyTask))
    m = new_manager(extra_plugins=[(plugin, "toy")])
    item = m.get("tasks", "toy_task")
    assert item.obj is _ToyTask and item.plugin == "toy"


def test_duplicate_name_names_both_sources():
    a = _plugin(register_tasks=lambda register: register(_ToyTask))
    b = _plugin(register_tasks=lambda register: register(_ToyTask))
    with pytest.raises(PluginError) as exc:
        new_manager(extra_plugins=[(a, "first"), (b, "second")])
    msg = str(exc.value)
    assert "toy_task" in msg and "'first'" in msg and "'second'" in msg


def test_unknown_name_lists_available():
    m = new_manager(extra_plugins=[(_plugin(register_tasks=lambda register: register(_ToyTask)), "toy")])
    with pytest.raises(PluginError) as exc:
        m.get("tasks", "toy_tsak")
    assert "toy_task" in str(exc.value) and "did you mean" in str(exc.value)


def test_registering_a_non_subclass_is_an_error():
    bad = _plugin(register_strategies=lambda register: register(_ToyTask))
    with pytest.raises(PluginError, match="not a subclass of mtlbench.api.Strategy"):
        new_manager(extra_plugins=[(bad, "bad")])


def test_unknown_hook_is_rejected_by_check_pending():
    @hookimpl
    def register_taks(register):  # misspelt hook name
        pass

    with pytest.raises(PluginError, match="register_taks"):
        new_manager(extra_plugins=[(types.SimpleNamespace(register_taks=register_taks), "typo")])


def test_hook_that_raises_is_a_warning(capsys):
    def boom(register):
        raise RuntimeError("kaput")

    m = new_manager(extra_plugins=[(_plugin(register_heads=boom), "boom")])
    assert any("boom" in w and "kaput" in w for w in m.warnings)
    assert "warning:" in capsys.readouterr().err


# ------------------------------------------------------------- real installed distributions


def _pip_install(src: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The out-of-tree plugins/mtlbench-boundary and a broken distribution, pip-installed into a target dir."""
    target = tmp_path_factory.mktemp("site")
    _pip_install(ROOT / "plugins" / "mtlbench-boundary", target)
    broken = tmp_path_factory.mktemp("broken")
    (broken / "mtlbench_broken").mkdir()
    (broken / "mtlbench_broken" / "__init__.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    (broken / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "mtlbench-broken"
        version = "0.0.1"
        [project.entry-points.mtlbench]
        broken = "mtlbench_broken"
        [tool.setuptools]
        packages = ["mtlbench_broken"]
    """))
    _pip_install(broken, target)
    return target


def _run(args: list[str], site: Path, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(site), **env)
    return subprocess.run([MTLBENCH, *args], capture_output=True, text=True, env=e, timeout=120)


def test_pip_installed_plugin_is_discovered(installed):
    r = _run(["plugins", "--json"], installed)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    boundary = [t for t in data["tasks"] if t["name"] == "boundary"]
    assert boundary and boundary[0]["distribution"] == "mtlbench-boundary"
    assert boundary[0]["version"] == "0.1.0"


def test_broken_plugin_is_one_warning_and_json_still_valid(installed):
    r = _run(["plugins", "--json"], installed)
    assert r.returncode == 0
    json.loads(r.stdout)  # stdout is pure JSON
    lines = [l for l in r.stderr.splitlines() if "mtlbench-broken" in l]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "broken on purpose" in lines[0]


def test_allowlist_restricts_distributions(installed):
    r = _run(["plugins", "--json"], installed, MTLBENCH_LOAD_PLUGINS="mtlbench-boundary")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert any(t["name"] == "boundary" for t in data["tasks"])
    assert "mtlbench-broken" not in r.stderr  # not loaded at all
    assert any(t["name"] == "segmentation" for t in data["tasks"])  # built-ins always load
    r = _run(["plugins", "--json"], installed, MTLBENCH_LOAD_PLUGINS="")
    data = json.loads(r.stdout)
    assert not any(t["name"] == "boundary" for t in data["tasks"])
    assert r.stderr == ""
