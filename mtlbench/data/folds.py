"""Patient-wise k-fold cross-validation splits: making, checking, saving and loading them.

A fold is ``{"fold": i, "train": [ids], "test": [ids]}``. Splits are by
patient (all slices of a patient are on one side), every patient is in exactly
one test fold, and the assignment depends only on the set of ids and the seed
(not on the order the ids come in).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mtlbench.errors import ConfigError, DataError
from mtlbench.fsutil import write_json

FOLDS_VERSION = 1


def make_folds(patient_ids: Sequence[str], k: int, seed: int) -> list[dict[str, Any]]:
    """Shuffle the (sorted) ids with ``seed`` and cut them into ``k`` test sets whose sizes differ by <= 1."""
    ids = [str(p) for p in patient_ids]
    dupes = sorted(p for p, n in Counter(ids).items() if n > 1)
    if dupes:
        raise DataError(f"patient ids appear more than once: {', '.join(dupes)}")
    if k < 2:
        raise ConfigError(f"experiment.folds: need at least 2 folds, got {k}")
    if len(ids) < k:
        raise ConfigError(f"experiment.folds: {k} folds need at least {k} patients, but there are only {len(ids)}")
    order = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = [order[i] for i in perm]
    bounds = np.linspace(0, len(shuffled), k + 1).round().astype(int)
    folds = []
    for i in range(k):
        test = shuffled[bounds[i] : bounds[i + 1]]
        test_set = set(test)
        folds.append({"fold": i, "train": [p for p in order if p not in test_set], "test": test})
    return folds


def check_folds(folds: Sequence[dict[str, Any]], patient_ids: Sequence[str]) -> None:
    """DataError on leakage (train and test of one fold share a patient), a patient in two test
    folds or in none, or an id that is not a known patient."""
    known = set(patient_ids)
    tested: dict[str, int] = {}
    for n, fold in enumerate(folds):
        idx = fold.get("fold", n)
        train, test = fold.get("train"), fold.get("test")
        if not isinstance(train, list) or not isinstance(test, list):
            raise DataError(f"fold {idx}: 'train' and 'test' must be lists of patient ids")
        for pid in train + test:
            if pid not in known:
                raise DataError(f"fold {idx}: unknown patient {pid!r}")
        leak = sorted(set(train) & set(test))
        if leak:
            raise DataError(f"fold {idx}: patient {leak[0]!r} is in both train and test (leakage)")
        for pid in test:
            if pid in tested:
                raise DataError(f"patient {pid!r} is in the test sets of folds {tested[pid]} and {idx}")
            tested[pid] = idx
    missing = sorted(known - set(tested))
    if missing:
        raise DataError(f"patient {missing[0]!r} is in no test fold ({len(missing)} patient(s) untested)")


def save_folds(path: str | Path, folds: Sequence[dict[str, Any]]) -> None:
    """Write the folds as JSON (atomically)."""
    write_json(path, {"version": FOLDS_VERSION, "folds": list(folds)})


def load_folds(path: str | Path, patient_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read folds written by :func:`save_folds` (or a bare list) and check them.

    Without ``patient_ids`` the patients are every id the file mentions.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: folds file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a readable folds JSON file ({exc})") from None
    folds = raw.get("folds") if isinstance(raw, dict) else raw
    if not isinstance(folds, list) or not all(isinstance(f, dict) for f in folds):
        raise DataError(f"{p}: expected {{\"folds\": [{{\"fold\", \"train\", \"test\"}}, ...]}}")
    for n, fold in enumerate(folds):
        if not isinstance(fold.get("fold", n), int):
            raise DataError(f"{p}: fold entry {n}: 'fold' must be an integer")
        for key in ("train", "test"):
            value = fold.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f"{p}: fold {fold.get('fold', n)}: {key!r} must be a list of patient ids")
    if patient_ids is None:
        patient_ids = sorted({pid for f in folds for pid in f["train"] + f["test"]})
    try:
        check_folds(folds, patient_ids)
    except DataError as exc:
        raise DataError(f"{p}: {exc}") from None
    return [
        {"fold": int(f.get("fold", n)), "train": list(f["train"]), "test": list(f["test"])}
        for n, f in enumerate(folds)
    ]
