"""Built-in loss-weighting strategies: GradNorm, DWA, RLW, GLS, FAMO and task-wise early stopping of auxiliary tasks.

Each weights the per-task losses (or their gradients) differently; the
formulas are in the class docstrings and docs/strategies.md, and each is
tested against a closed form in tests/test_loss_weighting.py. They register
through ``register_strategies`` like any plugin and need nothing from the
trainer but ``StepContext`` (``last_shared_parameters`` for GradNorm,
``loss_history`` for DWA) and the ``on_epoch_end`` hook (early stopping).
torch is imported inside functions only: this module is imported when the CLI starts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field

from mtlbench import api, hookimpl
from mtlbench.api import StepContext, Strategy
from mtlbench.builtin.strategies import Seed, Weight, check_task, step_rng, task_weights, weighted_backward
from mtlbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


# ----------------------------------------------------------------------------- GradNorm


class GradNormParams(api.Params):
    alpha: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.5
    lr: Positive | None = Field(None, description="learning rate of the task weights (default: the model's)")


class GradNorm(Strategy):
    """GradNorm (Chen et al., ICML 2018): learned task weights that balance gradient norms.

    With weights w_i (initially 1, renormalised to sum to T, the number of
    tasks, before every step), W the last shared layer
    (``ctx.last_shared_parameters``) and L_i(0) the first step's losses:

        G_i = w_i ||grad_W L_i||,  G_avg = mean_i G_i,
        r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)),
        L_grad = sum_i |G_i - G_avg r_i^alpha|  (the target is a constant),

    the network gets the gradient of sum_i w_i L_i and the weights get
    dL_grad/dw_i = sign(G_i - G_avg r_i^alpha) ||grad_W L_i||; the optimizer
    steps both (the weights with ``lr``). One extra backward per task to W.
    """

    name = "gradnorm"
    description = "GradNorm (Chen et al. 2018): learned weights that equalise task gradient norms at the last shared layer."
    Params: ClassVar[type[api.Params]] = GradNormParams

    def __init__(self, params: GradNormParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        self._weights: Any = None
        self.initial: dict[str, float] = {}

    @property
    def weights(self) -> "torch.nn.Parameter":
        """The task weights, created on first use (so validating a config does not import torch)."""
        if self._weights is None:
            import torch

            self._weights = torch.nn.Parameter(torch.ones(len(self.all_tasks), dtype=torch.float32))
        return self._weights

    def parameters(self) -> list[Any]:
        if self.params.lr is None:
            return [self.weights]
        return [{"params": [self.weights], "lr": float(self.params.lr)}]

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        import torch

        with torch.no_grad():  # the paper's renormalisation: sum_i w_i = T, weights positive
            self.weights.clamp_(min=1e-6)
            self.weights.mul_(len(self.all_tasks) / self.weights.sum())
        index = {t: i for i, t in enumerate(self.all_tasks)}
        tasks = [t for t in self.all_tasks if t in losses]
        for t in tasks:
            self.initial.setdefault(t, max(float(losses[t].detach()), 1e-12))
        layer = [p for p in (ctx.last_shared_parameters or ctx.shared_parameters) if p.requires_grad]
        norms = []
        for t in tasks:
            grads = torch.autograd.grad(losses[t], layer, retain_graph=True, allow_unused=True)
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
        w = [float(self.weights[index[t]].detach()) for t in tasks]
        g = [wi * ni for wi, ni in zip(w, norms)]
        ratios = [float(losses[t].detach()) / self.initial[t] for t in tasks]
        mean_ratio = sum(ratios) / len(ratios)
        g_avg = sum(g) / len(g)
        grad = torch.zeros_like(self.weights)
        for t, gi, ni, ri in zip(tasks, g, norms, ratios):
            target = g_avg * (ri / mean_ratio) ** self.params.alpha
            grad[index[t]] = math.copysign(ni, gi - target) if gi != target else 0.0
        self.weights.grad = grad
        weighted_backward(losses, {t: wi for t, wi in zip(tasks, w)})
        out = {f"weight/{t}": wi for t, wi in zip(tasks, w)}
        out.update({f"gradnorm/{t}": ni for t, ni in zip(tasks, norms)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"weights": [float(v) for v in self.weights.detach()], "initial": dict(self.initial)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.weights.copy_(torch.tensor(state.get("weights", [1.0] * len(self.all_tasks))))
        self.initial = dict(state.get("initial", {}))


# ----------------------------------------------------------------------------- DWA


class DWAParams(api.Params):
    temperature: Positive = 2.0


class DWA(Strategy):
    """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019).

    In epoch t (from 0) with r_i = L_i(t-1) / L_i(t-2), the ratio of the last
    two finished epochs' mean training losses (``ctx.loss_history``):
    w_i = K exp(r_i / T) / sum_j exp(r_j / T), K the number of tasks, T the
    temperature; w_i = 1 in the first two epochs. A task whose loss falls
    more slowly gets more weight.
    """

    name = "dwa"
    description = "Dynamic Weight Average (Liu et al. 2019): weights from the tasks' recent loss ratios."
    Params: ClassVar[type[api.Params]] = DWAParams

    def weights(self, loss_history: list[dict[str, float]]) -> dict[str, float]:
        tasks = self.all_tasks
        if len(loss_history) < 2 or any(t not in loss_history[-1] or t not in loss_history[-2] for t in tasks):
            return {t: 1.0 for t in tasks}
        ratios = {t: loss_history[-1][t] / max(loss_history[-2][t], 1e-12) for t in tasks}
        top = max(ratios.values()) / self.params.temperature  # subtracted for a stable softmax
        e = {t: math.exp(r / self.params.temperature - top) for t, r in ratios.items()}
        total = sum(e.values())
        return {t: len(tasks) * v / total for t, v in e.items()}

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        w = self.weights(ctx.loss_history)
        weighted_backward(losses, w)
        return {f"weight/{t}": v for t, v in w.items() if t in losses}


# ----------------------------------------------------------------------------- RLW


class RLWParams(api.Params):
    seed: Seed = 0


class RLW(Strategy):
    """Random Loss Weighting (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I) drawn anew every step.

    The draw depends only on (seed, step), so a resumed run draws the same weights.
    """

    name = "rlw"
    description = "Random Loss Weighting (Lin et al. 2022): softmax of a standard normal draw per step."
    Params: ClassVar[type[api.Params]] = RLWParams

    def weights(self, step: int) -> dict[str, float]:
        z = step_rng(self.params.seed, step).standard_normal(len(self.all_tasks))
        e = [math.exp(v - max(z)) for v in z]
        return {t: v / sum(e) for t, v in zip(self.all_tasks, e)}

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        w = self.weights(ctx.step)
        weighted_backward(losses, w)
        return {f"weight/{t}": v for t, v in w.items()}


# ----------------------------------------------------------------------------- GLS


class GLS(Strategy):
    """Geometric Loss Strategy (Chennupati et al., CVPR workshops 2019): L = (prod_i L_i)^(1/K).

    Computed as exp(mean_i log L_i); its gradient is L / K * sum_i grad L_i / L_i,
    so each task is weighted by L / (K L_i): the smaller a loss, the more it counts.
    """

    name = "gls"
    description = "Geometric Loss Strategy (Chennupati et al. 2019): the geometric mean of the task losses."

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        import torch

        logs = [torch.log(l.clamp_min(1e-12)) for l in losses.values()]
        total = torch.exp(torch.stack(logs).mean())
        total.backward()
        value = float(total.detach())
        k = len(losses)
        return {f"weight/{t}": value / (k * max(float(l.detach()), 1e-12)) for t, l in losses.items()}


# ----------------------------------------------------------------------------- FAMO


class FAMOParams(api.Params):
    lr: Positive = Field(0.025, description="learning rate of the task logits (the paper's beta)")
    gamma: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(0.001, description="decay of the logits")
    min_losses: dict[str, float] = Field({}, description="the lower bound b_i of each task's loss (default 0)")


class FAMO(Strategy):
    """Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

    Task logits xi (initially 0) give weights z = softmax(xi). With
    D_i = L_i - b_i + 1e-8 and c = 1 / sum_i (z_i / D_i), the network gets the
    gradient of sum_i z_i log(D_i) * c (held constant), i.e. of
    sum_i (c z_i / D_i) L_i: the weighted log-losses, which make every task
    decrease at the same rate. The logits are updated from the change of the
    log-losses between consecutive steps, delta_i = log D_i(prev) - log D_i(now):
    d = (dz/dxi)^T delta, and the optimizer steps xi with ``lr`` and decay
    ``gamma``. As in LibMTL, "now" is the next step's batch (the paper evaluates
    the same batch again after the step, which costs one more forward pass).
    """

    name = "famo"
    description = "FAMO (Liu et al. 2023): weights that make all task losses fall at the same rate, O(1) per step."
    Params: ClassVar[type[api.Params]] = FAMOParams

    def __init__(self, params: FAMOParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        for key in params.min_losses:
            check_task(key, self.all_tasks, "famo min_losses")
        self._logits: Any = None
        self.previous: list[float] | None = None

    @property
    def logits(self) -> "torch.nn.Parameter":
        """The task logits xi, created on first use (so validating a config does not import torch)."""
        if self._logits is None:
            import torch

            self._logits = torch.nn.Parameter(torch.zeros(len(self.all_tasks), dtype=torch.float32))
        return self._logits

    def parameters(self) -> list[Any]:
        return [{"params": [self.logits], "lr": float(self.params.lr), "weight_decay": float(self.params.gamma)}]

    def _d(self, values: list[float]) -> list[float]:
        return [v - float(self.params.min_losses.get(t, 0.0)) + 1e-8 for t, v in zip(self.all_tasks, values)]

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        import torch

        now = [float(losses[t].detach()) for t in self.all_tasks]
        if self.previous is not None:  # the logits' gradient from the last step's change
            delta = torch.tensor(
                [math.log(max(p, 1e-12)) - math.log(max(c, 1e-12)) for p, c in zip(self._d(self.previous), self._d(now))]
            )
            with torch.enable_grad():
                z = torch.softmax(self.logits, dim=0)
                (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
            self.logits.grad = grad
        self.previous = now
        z = torch.softmax(self.logits.detach(), dim=0).tolist()
        d = self._d(now)
        c = 1.0 / sum(zi / di for zi, di in zip(z, d))
        weights = {t: c * zi / di for t, zi, di in zip(self.all_tasks, z, d)}
        weighted_backward(losses, weights)
        out = {f"weight/{t}": w for t, w in weights.items()}
        out.update({f"z/{t}": zi for t, zi in zip(self.all_tasks, z)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"logits": [float(v) for v in self.logits.detach()], "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.logits.copy_(torch.tensor(state.get("logits", [0.0] * len(self.all_tasks))))
        self.previous = state.get("previous")


# ----------------------------------------------------------------------------- early stopping


class EarlyStopParams(api.Params):
    patience: Annotated[int, Field(ge=1)] = 2
    min_improvement: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.01
    weights: dict[str, Weight] = {}


class EarlyStopAuxiliary(Strategy):
    """Joint training that stops each auxiliary task once its training loss stops improving.

    Task-wise early stopping after Zhang et al. (ECCV 2014): after every epoch
    t, an auxiliary task (any task but the main one) whose mean training loss
    improved by less than ``min_improvement`` (relative) over the last
    ``patience`` epochs, (L(t - patience) - L(t)) / L(t - patience), is
    stopped: from the next epoch on its loss is neither computed nor learned.
    Zhang et al. also look at a validation error; mtlbench never selects on
    the test fold and holds no validation split, so only the training-loss
    trend decides. The loss is sum_t w_t L_t (``weights``, default 1) over the
    tasks still running.
    """

    name = "early_stop"
    description = "Joint training that stops an auxiliary task when its training loss plateaus (Zhang et al. 2014)."
    Params: ClassVar[type[api.Params]] = EarlyStopParams

    def __init__(self, params: EarlyStopParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        self.weights = task_weights(params.weights, self.all_tasks, "early_stop weights")
        if not self.weights.get(main_task, 0.0) and main_task in self.weights:
            raise ConfigError("strategies: early_stop weights: the main task's weight must be positive")
        self.stopped: dict[str, int] = {}  # task -> the epoch after which it stopped (from 1)

    def tasks_for_step(self, step: int) -> list[str]:
        return [t for t in self.all_tasks if t not in self.stopped]

    def should_stop(self, task: str, loss_history: list[dict[str, float]]) -> bool:
        k = self.params.patience
        values = [h[task] for h in loss_history if task in h]
        if len(values) <= k:
            return False
        before, now = values[-1 - k], values[-1]
        return (before - now) / max(abs(before), 1e-12) < self.params.min_improvement

    def on_epoch_end(self, epoch: int, loss_history: list[dict[str, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for task in self.all_tasks:
            if task == self.main_task or task in self.stopped:
                continue
            if self.should_stop(task, loss_history):
                self.stopped[task] = epoch + 1
                out[f"stopped/{task}"] = float(epoch + 1)
        return out

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        weighted_backward(losses, self.weights)
        return {f"weight/{t}": self.weights[t] for t in losses}

    def state_dict(self) -> dict[str, Any]:
        return {"stopped": dict(self.stopped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopped = {str(k): int(v) for k, v in (state.get("stopped") or {}).items()}


@hookimpl
def register_strategies(register):
    for cls in (GradNorm, DWA, RLW, GLS, FAMO, EarlyStopAuxiliary):
        register(cls)
