"""The plugin contract stays documented: every hook and every interface member appears in docs/plugins.md."""

from __future__ import annotations

import inspect
from pathlib import Path

from mtlbench import api, hookspecs

DOC = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()


def test_every_hookspec_is_documented_with_its_signature():
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("register_"):
            continue
        params = ", ".join(inspect.signature(fn).parameters)
        assert f"`{name}({params})`" in DOC, f"{name}({params}) missing from docs/plugins.md"


def test_every_interface_member_is_documented():
    for cls in (api.Task, api.Head, api.Strategy, api.DatasetSource, api.CacheGrid):
        for name, _ in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") and name != "__init__":
                continue
            assert f"`{name}(" in DOC, f"{cls.__name__}.{name} missing from docs/plugins.md"
