"""The loss-weighting strategies (mtlbench.builtin.loss_weighting) against closed forms on a tiny fixed model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mtlbench.api import StepContext
from mtlbench.builtin.loss_weighting import DWA, FAMO, GLS, RLW, EarlyStopAuxiliary, GradNorm
from mtlbench.config import validate_params
from mtlbench.errors import ConfigError

TASKS = ["segmentation", "landmarks"]
KINDS = {"segmentation": "classification", "landmarks": "regression"}


class Tiny(nn.Module):
    """A linear trunk (the shared layer) and one linear tail per task, float64, fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Linear(3, 4).double()
        self.tails = nn.ModuleDict({t: nn.Linear(4, 1).double() for t in TASKS})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def losses(self) -> dict[str, torch.Tensor]:
        x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.2]], dtype=torch.float64)
        f = self.trunk(x)
        return {t: (self.tails[t](f) - (i + 1.0)).pow(2).mean() for i, t in enumerate(TASKS)}


def ctx(model: Tiny, step: int = 0, history=None) -> StepContext:
    return StepContext(step, 0, list(model.trunk.parameters()), {t: list(model.tails[t].parameters()) for t in TASKS},
                       dict(KINDS), last_shared_parameters=list(model.trunk.parameters()), loss_history=history or [])


def trunk_grad(model: Tiny) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])


def task_grads(model: Tiny) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each task's own gradient on the trunk (flat) and its loss value, computed independently."""
    losses = model.losses()
    out = {}
    for t in TASKS:
        g = torch.autograd.grad(losses[t], list(model.trunk.parameters()), retain_graph=True)
        out[t] = torch.cat([x.reshape(-1) for x in g])
    return out, {t: float(l.detach()) for t, l in losses.items()}


def make(cls, **params):
    return cls(validate_params(cls.Params, params, "strategies.x.params"), TASKS, "segmentation")


def test_gradnorm_weight_update_on_a_hand_computed_step():
    model = Tiny()
    g, l = task_grads(model)
    s = make(GradNorm, alpha=1.5)
    s.initial = {"segmentation": 2 * l["segmentation"], "landmarks": l["landmarks"] / 2}  # as if losses had moved
    with torch.no_grad():
        s.weights.copy_(torch.tensor([0.5, 3.5]))  # renormalised to sum 2 by backward: [0.25, 1.75]
    log = s.backward(model.losses(), ctx(model))
    w = np.array([0.25, 1.75])
    n = np.array([float(g[t].norm()) for t in TASKS])
    G = w * n
    r = np.array([0.5, 2.0])  # L / L(0) per task
    target = G.mean() * (r / r.mean()) ** 1.5
    expected = np.sign(G - target) * n
    np.testing.assert_allclose(s.weights.grad.numpy(), expected, rtol=1e-6)
    assert log["weight/segmentation"] == pytest.approx(0.25) and log["gradnorm/landmarks"] == pytest.approx(n[1])
    torch.testing.assert_close(trunk_grad(model), 0.25 * g["segmentation"] + 1.75 * g["landmarks"])


def test_dwa_weights_from_loss_ratios():
    s = make(DWA, temperature=2.0)
    assert s.weights([]) == {"segmentation": 1.0, "landmarks": 1.0}  # first two epochs
    history = [{"segmentation": 1.0, "landmarks": 0.5}, {"segmentation": 0.8, "landmarks": 0.5}]
    w = s.weights(history)
    r = np.array([0.8, 1.0])
    e = np.exp(r / 2.0)
    np.testing.assert_allclose([w["segmentation"], w["landmarks"]], 2 * e / e.sum())
    assert w["landmarks"] > w["segmentation"]  # the task whose loss stalled gets more weight
    model = Tiny()
    g, _ = task_grads(model)
    s.backward(model.losses(), ctx(model, history=history))
    torch.testing.assert_close(trunk_grad(model), w["segmentation"] * g["segmentation"] + w["landmarks"] * g["landmarks"])


def test_rlw_weights_are_a_softmax_of_a_seeded_normal_draw():
    s = make(RLW, seed=3)
    z = np.random.default_rng([3, 7]).standard_normal(2)
    w = s.weights(7)
    np.testing.assert_allclose([w[t] for t in TASKS], np.exp(z) / np.exp(z).sum())
    assert s.weights(7) == w and s.weights(8) != w and sum(w.values()) == pytest.approx(1.0)


def test_gls_gradient_is_the_geometric_mean_rule():
    model = Tiny()
    g, l = task_grads(model)
    log = make(GLS).backward(model.losses(), ctx(model))
    total = math.sqrt(l["segmentation"] * l["landmarks"])
    expected = total / 2 * (g["segmentation"] / l["segmentation"] + g["landmarks"] / l["landmarks"])
    torch.testing.assert_close(trunk_grad(model), expected)
    assert log["weight/landmarks"] == pytest.approx(total / (2 * l["landmarks"]))


def test_famo_weighted_log_losses_and_logit_update():
    model = Tiny()
    g, l = task_grads(model)
    s = make(FAMO, lr=0.025, gamma=0.001)
    with torch.no_grad():
        s.logits.copy_(torch.tensor([0.3, -0.2]))
    s.previous = [2 * l["segmentation"], l["landmarks"] / 4]  # the last step's losses
    s.backward(model.losses(), ctx(model))
    z = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    d = np.array([l["segmentation"], l["landmarks"]]) + 1e-8
    c = 1 / (z / d).sum()
    torch.testing.assert_close(trunk_grad(model), c * z[0] / d[0] * g["segmentation"] + c * z[1] / d[1] * g["landmarks"])
    delta = np.log([2 * l["segmentation"] + 1e-8, l["landmarks"] / 4 + 1e-8]) - np.log(d)  # log D(prev) - log D(now)
    jac = np.diag(z) - np.outer(z, z)  # d softmax / d logits
    np.testing.assert_allclose(s.logits.grad.numpy(), jac.T @ delta, rtol=1e-5)
    (group,) = s.parameters()
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.001


def test_early_stop_triggers_when_the_auxiliary_loss_plateaus():
    s = make(EarlyStopAuxiliary, patience=2, min_improvement=0.05)
    improving = [{"segmentation": 1.0, "landmarks": 1.0}, {"segmentation": 0.9, "landmarks": 0.9},
                 {"segmentation": 0.8, "landmarks": 0.8}]
    assert s.on_epoch_end(2, improving) == {} and s.tasks_for_step(0) == TASKS
    flat = improving + [{"segmentation": 0.7, "landmarks": 0.79}]  # landmarks 0.9 -> 0.79 over 2 epochs: 12%
    assert s.on_epoch_end(3, flat) == {}
    flat = flat + [{"segmentation": 0.6, "landmarks": 0.78}]  # 0.8 -> 0.78 over 2 epochs: 2.5% < 5%
    assert s.on_epoch_end(4, flat) == {"stopped/landmarks": 5.0}
    assert s.tasks_for_step(0) == ["segmentation"]
    # the main task never stops; the state survives a checkpoint
    assert "segmentation" not in s.stopped
    other = make(EarlyStopAuxiliary)
    other.load_state_dict(s.state_dict())
    assert other.tasks_for_step(0) == ["segmentation"]


def test_params_are_validated():
    with pytest.raises(ConfigError, match="temperature"):
        validate_params(DWA.Params, {"temperature": 0}, "strategies.dwa.params")
    with pytest.raises(ConfigError, match="unknown key 'strategies.famo.params.beta'"):
        validate_params(FAMO.Params, {"beta": 1}, "strategies.famo.params")
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        make(EarlyStopAuxiliary, weights={"nope": 1.0})


def test_alternate_weighted_order_draws_in_proportion():
    from mtlbench.builtin.strategies import Alternate

    s = make(Alternate, order="weighted", weights={"segmentation": 3.0, "landmarks": 1.0}, seed=2)
    picks = [s.task_at(i) for i in range(4000)]
    assert picks.count("segmentation") / 4000 == pytest.approx(0.75, abs=0.03)
    assert picks == [s.task_at(i) for i in range(4000)]  # depends on (seed, step) only
    with pytest.raises(ConfigError, match="only with order = 'weighted'"):
        make(Alternate, weights={"segmentation": 2.0})
