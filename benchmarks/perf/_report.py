"""What every benchmark of ``make bench`` reports: checks (a measured ratio beside its target) as printed lines and JSON.

A benchmark calls :func:`check` for each figure it is judged on and
:func:`finish` once at the end; with ``--json PATH`` (or the environment
variable ``MTLBENCH_BENCH_JSON``) its checks and free-form figures are written
there, which ``benchmarks/perf/run_all.py`` collects into one table.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

_CHECKS: list[dict[str, Any]] = []
_FIGURES: dict[str, Any] = {}


def check(name: str, value: float, target: str, passed: bool | None, unit: str = "x", note: str = "") -> None:
    """Record and print one judged figure: ``target`` like ``"<= 1.15"``; ``passed`` None means informative only."""
    _CHECKS.append({"name": name, "value": float(value), "unit": unit, "target": target, "pass": passed, "note": note})
    verdict = {True: "PASS", False: "FAIL", None: "info"}[passed]
    print(f"CHECK {name}: {value:.3g}{unit} (target {target}) {verdict}{' - ' + note if note else ''}")


def figure(key: str, value: Any) -> None:
    """A measured figure that is not judged (kept in the JSON for the docs)."""
    _FIGURES[key] = value


def machine() -> str:
    """The machine in a few words (CPU model, cores) for the JSON and the docs."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def finish(bench: str, json_path: str | None = None) -> None:
    """Write the checks and figures as JSON to ``json_path`` or ``$MTLBENCH_BENCH_JSON`` (when either is set)."""
    path = json_path or os.environ.get("MTLBENCH_BENCH_JSON")
    if not path:
        return
    out = {"bench": bench, "machine": machine(), "checks": _CHECKS, "figures": _FIGURES}
    tmp = Path(path).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
