"""Where a trial's training batches come from, and the per-trial decisions around the step.

- ``resources.loader`` / ``memory_budget_mb``: the run keeps the slices in memory
  while they fit the budget and streams them from the cache beyond it; a trial
  trained on streamed batches is the *same* trial (identical metrics and
  weights) as one trained from memory, because both loaders return the same
  batches in the same order.
- Slices resident on a GPU (``devices.resident_on_device``, ``DeviceSlices``):
  the decision is tested here on the CPU; the gathering code runs on CPU tensors.
- Per-trial timings in the record, fused Adam, and deterministic algorithms
  without importing torch's compiler.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mtlbench.assemble import resolve_plugins
from mtlbench.config import validate_config
from mtlbench.data.cache import build_cache, load_slices, open_cache, stacked_nbytes
from mtlbench.data.folds import make_folds
from mtlbench.devices import RESIDENT_FRACTION, resident_on_device, step_settings
from mtlbench.engine.checkpoint import load_checkpoint
from mtlbench.engine.metrics import confusion
from mtlbench.engine.train import DeviceSlices, run_trial
from mtlbench.engine.trialspec import TrialSpec
from mtlbench.orchestrate.runner import choose_loader, default_memory_budget_mb
from mtlbench.testing import tiny_config

SPEC = TrialSpec(fold=0, strategy="joint", params={}, seed=3)


@pytest.fixture(scope="module")
def setup():
    cfg = validate_config(tiny_config(tasks={"landmarks": {}}, overrides={"train": {"epochs": 2, "eval_every": 1}}))
    resolve_plugins(cfg)
    cache = build_cache(cfg)
    folds = make_folds(list(open_cache(cache).patients), cfg.experiment.folds, 0)
    return cfg, cache, folds


def with_resources(cfg, **values):
    raw = cfg.to_toml_dict()
    raw["resources"] = {**raw.get("resources", {}), **values}
    return validate_config(raw)


def test_stacked_nbytes_is_what_load_slices_holds(setup):
    cfg, cache, folds = setup
    ids = list(folds[0]["train"])
    data = load_slices(cache, ids)
    held = data.image.nbytes + data.labels.nbytes + sum(a.nbytes for a in data.targets.values())
    assert stacked_nbytes(cache, ids) == held


def test_auto_loader_streams_only_past_the_budget(setup):
    cfg, cache, _ = setup
    ids = list(open_cache(cache).patients)
    need_mb = stacked_nbytes(cache, ids) / 2**20
    loader, why = choose_loader(with_resources(cfg, memory_budget_mb=int(need_mb) + 1), cache, ids)
    assert loader == "memory" and "budget" in why
    loader, why = choose_loader(with_resources(cfg, memory_budget_mb=1), cache, ids) if need_mb > 1 else ("stream", "")
    assert loader == "stream"
    assert choose_loader(with_resources(cfg, loader="stream"), cache, ids)[0] == "stream"
    assert choose_loader(with_resources(cfg, loader="memory", memory_budget_mb=1), cache, ids)[0] == "memory"
    assert choose_loader(cfg, cache, ids)[0] == "memory"  # the default budget: a quarter of this machine's memory
    assert default_memory_budget_mb() > 100


def test_loader_keys_are_validated():
    raw = tiny_config()
    raw["resources"] = {"loader": "disk"}
    with pytest.raises(Exception, match="loader"):
        validate_config(raw)
    raw["resources"] = {"memory_budget_mb": 0}
    with pytest.raises(Exception, match="memory_budget_mb"):
        validate_config(raw)


def test_streamed_trial_is_the_same_trial(setup, tmp_path):
    cfg, cache, folds = setup
    mem = run_trial(cfg, SPEC, cache, folds, tmp_path / "memory", loader="memory", cpus=1)
    streamed = run_trial(cfg, SPEC, cache, folds, tmp_path / "stream", loader="stream", cpus=1)
    assert (mem["loader"], streamed["loader"]) == ("memory", "stream")
    assert streamed["metrics"] == mem["metrics"]
    assert [h["train"] for h in streamed["history"]] == [h["train"] for h in mem["history"]]
    a = load_checkpoint(tmp_path / "memory" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "stream" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_record_says_where_the_time_went(setup, tmp_path):
    cfg, cache, folds = setup
    rec = run_trial(cfg, SPEC, cache, folds, tmp_path, cpus=1)
    t = rec["timings"]
    assert set(t) == {"startup_s", "train_s", "eval_s", "final_eval_s", "report_s"}
    assert all(v > 0 for v in t.values()), t
    assert sum(t.values()) <= rec["wall_time_s"] + 1e-6
    assert sum(t.values()) > 0.8 * rec["wall_time_s"]  # the phases cover the trial
    assert rec["step_settings"]["fused_optimizer"] is True


def test_resident_on_device_rule():
    gb = 2**30
    assert not resident_on_device("cpu", 1, free_bytes=100 * gb)
    assert resident_on_device("cuda", int(RESIDENT_FRACTION * 80 * gb), free_bytes=80 * gb)
    assert not resident_on_device("cuda:1", int(RESIDENT_FRACTION * 80 * gb) + 1, free_bytes=80 * gb)


def test_device_slices_gather_the_same_batches(setup):
    cfg, cache, folds = setup
    data = load_slices(cache, list(folds[0]["train"]))
    dev = DeviceSlices.from_slices(data, "cpu")
    rng = np.random.default_rng(0)
    plan = [rng.choice(len(data), size=5, replace=False) for _ in range(3)]
    keys = ["labels", *sorted(data.targets)]
    for a, b in zip(data.batches(plan, keys), dev.batches(plan, keys)):
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k].numpy()), k
    assert np.array_equal(dev.foreground, data.foreground) and dev.targets_available == set(data.targets)


def test_fused_adam_is_chosen_on_cpu_and_cuda():
    assert step_settings("cpu").fused_optimizer and step_settings("cpu").to_record()["fused_optimizer"]
    assert not step_settings("mps").fused_optimizer


def test_deterministic_algorithms_without_the_compiler():
    code = (
        "import sys, torch\n"
        "from mtlbench.devices import deterministic_algorithms\n"
        "deterministic_algorithms(True)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.is_deterministic_algorithms_warn_only_enabled()\n"
        "assert 'torch._inductor' not in sys.modules, 'inductor imported'\n"
        "deterministic_algorithms(True, compiling=True)\n"
        "assert 'torch._inductor' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_confusion_paths_agree(n):
    rng = np.random.default_rng(n)
    p = rng.integers(0, n, size=(7, 33, 29)).astype(np.uint8)
    r = rng.integers(0, n, size=(7, 33, 29)).astype(np.int64)
    expected = np.zeros((n, n), dtype=np.int64)
    np.add.at(expected, (p.ravel(), r.ravel()), 1)
    assert np.array_equal(confusion(p, r, n), expected)
