"""What identifies a trial: (fold, strategy label, strategy parameters, seed), and its stable id."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrialSpec:
    """``strategy`` is the config label under [strategies]; ``params`` one point of its grid."""

    fold: int
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def id(self) -> str:
        """Stable, filesystem-safe: label, swept values, a hash of all params, fold, seed."""
        flat = flatten(self.params)
        tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(flat.items()))
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "", tag)[:40]
        digest = hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:6]
        middle = f"{tag}-{digest}" if self.params else "default"
        return f"{self.strategy}-{middle}-f{self.fold}-s{self.seed}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
