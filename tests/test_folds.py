"""Tests for mtlbench.data.folds: patient-wise k-fold splits, leakage checks and the JSON file."""

from __future__ import annotations

import json

import pytest

from mtlbench.data.folds import check_folds, load_folds, make_folds, save_folds
from mtlbench.errors import ConfigError, DataError

IDS = [f"p{n:02d}" for n in range(23)]


@pytest.mark.parametrize("k", [2, 5, 23])
def test_every_patient_tested_once_without_leakage(k):
    folds = make_folds(IDS, k, seed=0)
    assert [f["fold"] for f in folds] == list(range(k))
    sizes = [len(f["test"]) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(IDS)
    tested = [p for f in folds for p in f["test"]]
    assert sorted(tested) == IDS
    for f in folds:
        assert not set(f["train"]) & set(f["test"])
        assert sorted(f["train"] + f["test"]) == IDS
    check_folds(folds, IDS)


def test_deterministic_by_seed_and_independent_of_input_order():
    a = make_folds(IDS, 5, seed=7)
    assert make_folds(list(reversed(IDS)), 5, seed=7) == a
    assert make_folds(IDS, 5, seed=8) != a
    assert [len(f["test"]) for f in make_folds(IDS[:20], 5, 1)] == [4] * 5


def test_errors():
    with pytest.raises(ConfigError, match="5 folds.*only 3"):
        make_folds(IDS[:3], 5, 0)
    with pytest.raises(ConfigError, match="at least 2"):
        make_folds(IDS, 1, 0)
    with pytest.raises(DataError, match="p01"):
        make_folds(["p01", "p02", "p01"], 2, 0)


def test_check_folds_finds_leakage_duplicates_and_gaps():
    good = make_folds(IDS[:6], 3, 0)
    leak = [dict(f) for f in good]
    leak[0] = {**leak[0], "train": leak[0]["train"] + [leak[0]["test"][0]]}
    with pytest.raises(DataError, match="both train and test"):
        check_folds(leak, IDS[:6])
    twice = [dict(f) for f in good]
    moved = twice[0]["test"][0]
    twice[1] = {
        "fold": 1,
        "train": [p for p in twice[1]["train"] if p != moved],
        "test": twice[1]["test"] + [moved],
    }
    with pytest.raises(DataError, match="test sets of folds 0 and 1"):
        check_folds(twice, IDS[:6])
    with pytest.raises(DataError, match="no test fold"):
        check_folds(good, IDS[:7])
    with pytest.raises(DataError, match="unknown patient"):
        check_folds(good, IDS[:5])


def test_save_and_load(tmp_path):
    folds = make_folds(IDS, 5, 3)
    path = tmp_path / "folds.json"
    save_folds(path, folds)
    assert json.loads(path.read_text())["folds"] == folds
    assert load_folds(path) == folds
    assert load_folds(path, IDS) == folds
    assert [p.name for p in tmp_path.iterdir()] == ["folds.json"]  # no temp file left
    with pytest.raises(DataError, match="no test fold"):
        load_folds(path, IDS + ["extra"])
    bad = [dict(f) for f in folds]
    bad[0] = {**bad[0], "train": bad[0]["train"] + bad[0]["test"][:1]}
    path.write_text(json.dumps({"folds": bad}))
    with pytest.raises(DataError, match="folds.json.*leakage"):
        load_folds(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="folds.json"):
        load_folds(path)
    with pytest.raises(DataError, match="not found"):
        load_folds(tmp_path / "missing.json")
