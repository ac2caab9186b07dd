"""Tests of the built-in training strategies against independent gradient computations."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mtlbench.api import StepContext
from mtlbench.errors import ConfigError
from mtlbench.plugins import get_manager, new_manager, reset_manager

TASKS = ["segmentation", "landmarks"]
KINDS = {"segmentation": "classification", "landmarks": "regression"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"


# ----------------------------------------------------------------------------- a tiny two-task model


class Tiny(nn.Module):
    """A shared conv trunk and one small conv tail per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.tails = nn.ModuleDict({"segmentation": nn.Conv2d(4, 3, 1), "landmarks": nn.Conv2d(4, 1, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        return {t: tail(f) for t, tail in self.tails.items()}


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 1, 8, 8, generator=g),
        "labels": torch.randint(0, 3, (2, 8, 8), generator=g),
        "heatmaps": torch.rand(2, 1, 8, 8, generator=g),
    }


def task_losses(model: Tiny, batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out = model(batch["image"])
    fns = {
        "segmentation": lambda: nn.functional.cross_entropy(out["segmentation"], batch["labels"]),
        "landmarks": lambda: torch.sqrt(nn.functional.mse_loss(out["landmarks"], batch["heatmaps"])),
    }
    return {t: fns[t]() for t in names}


def make_ctx(model: Tiny, step: int = 0) -> StepContext:
    return StepContext(
        step=step,
        epoch=0,
        shared_parameters=list(model.trunk.parameters()),
        task_parameters={t: list(model.tails[t].parameters()) for t in TASKS},
        task_kinds=dict(KINDS),
    )


def strategy(name: str, tasks: list[str] = TASKS, main_task: str = "segmentation", **params):
    reset_manager()
    cls = get_manager().get("strategies", name).obj
    return cls(cls.Params(**params), tasks, main_task)


def grads_of(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def independent_grads(model: Tiny, batch, task: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """d l_task / d (trunk, own tail), computed on a fresh forward with plain autograd."""
    loss = task_losses(model, batch, [task])[task]
    shared = list(model.trunk.parameters())
    tail = list(model.tails[task].parameters())
    g = torch.autograd.grad(loss, shared + tail)
    return list(g[: len(shared)]), list(g[len(shared):])


def flat(gs) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs])


# ----------------------------------------------------------------------------- registration


def test_all_registered_by_mtlbench():
    reset_manager()
    reg = get_manager().registry("strategies")
    for name in ["single", "joint", "alternate", "uncertainty", "pcgrad"]:
        item = reg.get(name)
        assert item.distribution == "mtlbench"
        assert item.obj.description


# ----------------------------------------------------------------------------- single / joint


def test_single_defaults_to_main_task_and_learns_only_it():
    s = strategy("single", main_task="landmarks")
    assert s.model_tasks() == ["landmarks"]
    assert s.tasks_for_step(5) == ["landmarks"]
    model, batch = make_model(), make_batch()
    log = s.backward(task_losses(model, batch, ["landmarks"]), make_ctx(model))
    assert log == {"weight/landmarks": 1.0}
    exp_shared, exp_tail = independent_grads(model, batch, "landmarks")
    for p, g in zip(model.trunk.parameters(), exp_shared):
        assert torch.equal(p.grad, g)
    assert all(p.grad is None for p in model.tails["segmentation"].parameters())
    assert strategy("single", task="segmentation", main_task="landmarks").model_tasks() == ["segmentation"]


def test_joint_with_zero_weight_equals_single():
    model, batch = make_model(), make_batch()
    single = strategy("single")
    single.backward(task_losses(model, batch, single.tasks_for_step(0)), make_ctx(model))
    expected = grads_of(model.trunk.parameters())
    model.zero_grad(set_to_none=True)

    joint = strategy("joint", weights={"segmentation": 1, "landmarks": 0})
    assert joint.model_tasks() == TASKS
    log = joint.backward(task_losses(model, batch, joint.tasks_for_step(0)), make_ctx(model))
    assert log == {"weight/segmentation": 1.0, "weight/landmarks": 0.0}
    for got, exp in zip(grads_of(model.trunk.parameters()), expected):
        torch.testing.assert_close(got, exp, atol=1e-7, rtol=0)


def test_joint_gradients_are_weighted_sum():
    model, batch = make_model(), make_batch()
    joint = strategy("joint", weights={"landmarks": 3.0})  # segmentation defaults to 1
    log = joint.backward(task_losses(model, batch, TASKS), make_ctx(model))
    assert log == {"weight/segmentation": 1.0, "weight/landmarks": 3.0}
    seg, seg_tail = independent_grads(model, batch, "segmentation")
    lm, lm_tail = independent_grads(model, batch, "landmarks")
    torch.testing.assert_close(flat(grads_of(model.trunk.parameters())), flat(seg) + 3.0 * flat(lm))
    torch.testing.assert_close(flat(grads_of(model.tails["landmarks"].parameters())), 3.0 * flat(lm_tail))
    torch.testing.assert_close(flat(grads_of(model.tails["segmentation"].parameters())), flat(seg_tail))


def test_bad_params():
    with pytest.raises(ConfigError, match=r"joint weights: unknown task 'landmark'.*tasks: segmentation, landmarks"):
        strategy("joint", weights={"landmark": 2.0})
    with pytest.raises(ConfigError, match=r"single task: unknown task 'liver'"):
        strategy("single", task="liver")
    with pytest.raises(ConfigError, match="every task's weight is 0"):
        strategy("joint", weights={"segmentation": 0, "landmarks": 0})
    reset_manager()
    joint = get_manager().get("strategies", "joint").obj
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        joint.Params(weights={"landmarks": -1.0})
    with pytest.raises(ValidationError):
        joint.Params(weight={"landmarks": 1.0})  # unknown key
    alternate = get_manager().get("strategies", "alternate").obj
    with pytest.raises(ValidationError):
        alternate.Params(order="shuffle")


# ----------------------------------------------------------------------------- alternate


def test_alternate_updates_only_chosen_tail():
    model, batch = make_model(), make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    s = strategy("alternate")
    assert [s.tasks_for_step(i)[0] for i in range(5)] == [
        "segmentation", "landmarks", "segmentation", "landmarks", "segmentation"
    ]
    for step in range(3):  # from step 1 on, the idle tail has Adam state but no gradient
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        names = s.tasks_for_step(step)
        opt.zero_grad(set_to_none=True)
        log = s.backward(task_losses(model, batch, names), make_ctx(model, step))
        opt.step()
        (chosen,) = names
        assert log == {"task": chosen}
        (other,) = [t for t in TASKS if t != chosen]
        for n, p in model.named_parameters():
            if n.startswith(f"tails.{other}."):
                assert torch.equal(p, before[n]), n
            elif n.endswith("weight"):  # trunk and chosen tail move
                assert not torch.equal(p, before[n]), n


def test_alternate_random_is_reproducible():
    a = strategy("alternate", order="random", seed=3)
    b = strategy("alternate", order="random", seed=3)
    c = strategy("alternate", order="random", seed=4)
    seq_a = [a.tasks_for_step(i)[0] for i in range(64)]
    assert seq_a == [b.tasks_for_step(i)[0] for i in range(64)]
    assert seq_a != [c.tasks_for_step(i)[0] for i in range(64)]
    assert set(seq_a) == set(TASKS)
    # depends on the step only: asking out of order (as after a resume) gives the same answer
    assert [a.tasks_for_step(i)[0] for i in reversed(range(64))] == seq_a[::-1]


# ----------------------------------------------------------------------------- uncertainty


def test_uncertainty_closed_form():
    model, batch = make_model(), make_batch()
    s_values = {"segmentation": 0.3, "landmarks": -0.7}
    strat = strategy("uncertainty")
    strat.load_state_dict({"log_variance": s_values})
    params = strat.parameters()
    assert len(params) == 2 and all(p.shape == () for p in params)

    losses = task_losses(model, batch, TASKS)
    l = {t: float(v.detach()) for t, v in losses.items()}
    C = {"segmentation": 1.0, "landmarks": 0.5}
    # the regression task's loss is an RMSE: the Gaussian likelihood is written on its square
    e = {"segmentation": l["segmentation"], "landmarks": l["landmarks"] ** 2}
    expected_obj = sum(C[t] * math.exp(-s_values[t]) * e[t] + s_values[t] / 2 for t in TASKS)
    assert float(strat.objective(losses, KINDS).detach()) == pytest.approx(expected_obj, rel=1e-6)

    log = strat.backward(losses, make_ctx(model))
    for t in TASKS:
        s = torch.tensor(s_values[t], dtype=torch.float32).item()
        assert log[f"s/{t}"] == pytest.approx(s)
        assert log[f"sigma/{t}"] == pytest.approx(math.exp(s / 2))
        assert log[f"weight/{t}"] == pytest.approx(C[t] * math.exp(-s))
        assert strat.log_variances[t].grad.item() == pytest.approx(C[t] * -math.exp(-s) * e[t] + 0.5, rel=1e-5)

    seg, _ = independent_grads(model, batch, "segmentation")
    lm, lm_tail = independent_grads(model, batch, "landmarks")
    # d/dtheta of C exp(-s) l^2 = (2 C exp(-s) l) dl/dtheta: the effective lambda of the landmark loss
    w = {"segmentation": math.exp(-s_values["segmentation"]),
         "landmarks": 2 * C["landmarks"] * math.exp(-s_values["landmarks"]) * l["landmarks"]}
    assert log["lambda/landmarks"] == pytest.approx(w["landmarks"], rel=1e-5)
    assert log["lambda/segmentation"] == pytest.approx(w["segmentation"], rel=1e-5)
    torch.testing.assert_close(
        flat(grads_of(model.trunk.parameters())), w["segmentation"] * flat(seg) + w["landmarks"] * flat(lm)
    )
    torch.testing.assert_close(flat(grads_of(model.tails["landmarks"].parameters())), w["landmarks"] * flat(lm_tail))


def test_uncertainty_learns_and_state_round_trips():
    model, batch = make_model(), make_batch()
    strat = strategy("uncertainty", init=0.5)
    assert strat.state_dict() == {"log_variance": {"segmentation": 0.5, "landmarks": 0.5}}
    opt = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": strat.parameters(), "weight_decay": 0.0}], lr=0.05
    )
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        strat.backward(task_losses(model, batch, TASKS), make_ctx(model, step))
        opt.step()
    state = strat.state_dict()
    assert state["log_variance"]["segmentation"] != 0.5
    other = strategy("uncertainty")
    other.load_state_dict(state)
    assert other.state_dict() == state
    for t in TASKS:
        assert torch.equal(other.log_variances[t], strat.log_variances[t])
    with pytest.raises(ConfigError, match="checkpoint has log-variances"):
        strategy("uncertainty", tasks=["segmentation"]).load_state_dict(state)


def test_uncertainty_reaches_its_stationary_point_with_its_own_learning_rate():
    """With fixed losses, s_t settles where the objective's derivative vanishes:
    exp(s) = l^2 (RMSE read as MSE), = l ("mse"), = 2 l (classification)."""
    losses = {"segmentation": torch.tensor(0.3), "landmarks": torch.tensor(0.01)}  # an RMSE of 0.01: MSE 1e-4
    for mode, expect_lm in (("rmse", math.log(1e-4)), ("mse", math.log(0.01))):
        strat = strategy("uncertainty", lr=0.05, regression_loss=mode)
        (group,) = strat.parameters()
        assert group["lr"] == 0.05
        opt = torch.optim.Adam([group])
        for _ in range(1500):
            opt.zero_grad(set_to_none=True)
            strat.objective(losses, KINDS).backward()
            opt.step()
        s = strat.state_dict()["log_variance"]
        assert s["landmarks"] == pytest.approx(expect_lm, abs=0.05), mode
        assert s["segmentation"] == pytest.approx(math.log(0.6), abs=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uncertainty_cpu_leaves_with_cuda_model():
    model, batch = make_model().cuda(), {k: v.cuda() for k, v in make_batch().items()}
    strat = strategy("uncertainty")
    opt = torch.optim.Adam([{"params": model.parameters()}, {"params": strat.parameters()}], lr=0.05)
    opt.zero_grad(set_to_none=True)
    strat.backward(task_losses(model, batch, TASKS), make_ctx(model))
    opt.step()
    assert all(p.device.type == "cpu" and p.grad is not None for p in strat.parameters())
    assert strat.state_dict()["log_variance"]["segmentation"] != 0.0


# ----------------------------------------------------------------------------- pcgrad


class Linear(nn.Module):
    """Losses with known gradients: l_t = w . a_t + v_t . b_t (w shared, v_t the tail)."""

    def __init__(self, a: dict[str, torch.Tensor]) -> None:
        super().__init__()
        n = len(next(iter(a.values())))
        self.a = a
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.v = nn.ParameterDict({t: nn.Parameter(torch.zeros(2, dtype=torch.float64)) for t in a})
        self.b = {t: torch.tensor([1.0, float(i + 2)], dtype=torch.float64) for i, t in enumerate(a)}

    def losses(self) -> dict[str, torch.Tensor]:
        return {t: self.w.dot(self.a[t]) + self.v[t].dot(self.b[t]) for t in self.a}

    def ctx(self, step: int = 0) -> StepContext:
        return StepContext(step, 0, [self.w], {t: [self.v[t]] for t in self.a}, {t: "regression" for t in self.a})


def pcgrad_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad for two tasks, written out from the paper."""
    d = g1.dot(g2)
    if d >= 0:
        return g1 + g2
    return (g1 - d / g2.dot(g2) * g2) + (g2 - d / g1.dot(g1) * g1)


def test_pcgrad_conflicting_two_tasks():
    a = {"segmentation": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64),
         "landmarks": torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)}
    assert a["segmentation"].dot(a["landmarks"]) < 0
    m = Linear(a)
    s = strategy("pcgrad")
    log = s.backward(m.losses(), m.ctx())
    g = m.w.grad
    for t in TASKS:
        assert g.dot(a[t]) >= -1e-12
        torch.testing.assert_close(m.v[t].grad, m.b[t])  # each tail: its own loss' gradient
    torch.testing.assert_close(g, pcgrad_two(a["segmentation"], a["landmarks"]))
    cos = float(a["segmentation"].dot(a["landmarks"]) / (a["segmentation"].norm() * a["landmarks"].norm()))
    assert log["cos/segmentation/landmarks"] == pytest.approx(cos)
    assert log["conflicts"] == 1.0 and log["projections"] == 2.0


def test_pcgrad_non_conflicting_is_plain_sum():
    a = {"segmentation": torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
         "landmarks": torch.tensor([0.2, 1.0, -0.1], dtype=torch.float64)}
    m = Linear(a)
    log = strategy("pcgrad").backward(m.losses(), m.ctx())
    assert torch.equal(m.w.grad, a["segmentation"] + a["landmarks"])
    assert log["conflicts"] == 0.0 and log["projections"] == 0.0


def test_pcgrad_three_tasks_seeded_order():
    gen = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    a = {t: torch.randn(6, generator=gen, dtype=torch.float64) for t in names}
    a["c"] = -(a["a"] + a["b"])  # forces conflicts

    def run(seed: int, step: int) -> torch.Tensor:
        m = Linear(a)
        reset_manager()
        cls = get_manager().get("strategies", "pcgrad").obj
        cls(cls.Params(seed=seed), names, "a").backward(m.losses(), m.ctx(step))
        return m.w.grad

    first = run(0, 7)
    assert torch.equal(first, run(0, 7))
    # an independent implementation of the algorithm, with the same per-step order
    rng = np.random.default_rng([0, 7])
    total = torch.zeros(6, dtype=torch.float64)
    for i, t in enumerate(names):
        pc = a[t].clone()
        for j in rng.permutation([k for k in range(3) if k != i]):
            gj = a[names[j]]
            d = pc.dot(gj)
            if d < 0:
                pc = pc - d / gj.dot(gj) * gj
        total += pc
    torch.testing.assert_close(first, total)


def test_pcgrad_on_conv_model():
    model, batch = make_model(), make_batch()
    log = strategy("pcgrad").backward(task_losses(model, batch, TASKS), make_ctx(model))
    seg, seg_tail = independent_grads(model, batch, "segmentation")
    lm, lm_tail = independent_grads(model, batch, "landmarks")
    got = flat(grads_of(model.trunk.parameters()))
    torch.testing.assert_close(got, pcgrad_two(flat(seg), flat(lm)))
    for g in (flat(seg), flat(lm)):
        assert float(got.dot(g)) >= -1e-6 * float(g.dot(g))
    torch.testing.assert_close(flat(grads_of(model.tails["segmentation"].parameters())), flat(seg_tail))
    torch.testing.assert_close(flat(grads_of(model.tails["landmarks"].parameters())), flat(lm_tail))
    cos = float(flat(seg).dot(flat(lm)) / (flat(seg).norm() * flat(lm).norm()))
    assert log["cos/segmentation/landmarks"] == pytest.approx(cos, abs=1e-5)


# ----------------------------------------------------------------------------- the docs' plugin example


def load_docs_example() -> types.ModuleType:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- example-plugin -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/strategies.md lost its example plugin block"
    module = types.ModuleType("docs_example_strategy")
    exec(compile(match.group(1), str(DOCS), "exec"), module.__dict__)
    return module


def test_docs_example_plugin_registers_and_runs():
    module = load_docs_example()
    manager = new_manager(extra_plugins=[(module, "docs_example")], load_entry_points=False)
    item = manager.get("strategies", "normsum")
    cls = item.obj
    model, batch = make_model(), make_batch()
    log = cls(cls.Params(), TASKS, "segmentation").backward(task_losses(model, batch, TASKS), make_ctx(model))
    seg, seg_tail = independent_grads(model, batch, "segmentation")
    lm, _ = independent_grads(model, batch, "landmarks")
    n_seg, n_lm = flat(seg).norm(), flat(lm).norm()
    mean = (n_seg + n_lm) / 2
    torch.testing.assert_close(
        flat(grads_of(model.trunk.parameters())), flat(seg) * (mean / n_seg) + flat(lm) * (mean / n_lm)
    )
    torch.testing.assert_close(flat(grads_of(model.tails["segmentation"].parameters())), flat(seg_tail))
    assert log["norm/segmentation"] == pytest.approx(float(n_seg), rel=1e-5)
