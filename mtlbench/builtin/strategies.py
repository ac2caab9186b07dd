"""The built-in training strategies (single, joint, alternate, uncertainty, pcgrad) and their gradient helpers.

Each strategy is a :class:`mtlbench.api.Strategy` registered through the
``register_strategies`` hook, exactly as a third-party plugin would register
one: the trainer has no special case for any of them. ``task_gradients``,
``assign_shared_gradient``, ``assign_tail_gradients`` and ``assign_gradients`` are the building blocks of
per-task-gradient methods (PCGrad here); plugins may reuse them.

torch is imported inside functions only: this module is imported when the CLI
starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from mtlbench import api, hookimpl
from mtlbench.api import StepContext, Strategy
from mtlbench.errors import ConfigError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Kendall et al.'s factor C_t per task kind: 1/sigma^2 for a classification
#: (softmax) likelihood, 1/(2 sigma^2) for a Gaussian (regression) one.
KIND_FACTOR: dict[str, float] = {"classification": 1.0, "regression": 0.5}

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0)]


def check_task(label: str, tasks: list[str], where: str) -> None:
    """Raise a one-line ConfigError when ``label`` is not one of ``tasks``."""
    if label in tasks:
        return
    hint = difflib.get_close_matches(label, tasks, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"strategies: {where}: unknown task {label!r}{extra}; tasks: {', '.join(tasks)}")


def task_weights(weights: dict[str, float], tasks: list[str], where: str) -> dict[str, float]:
    """Every task's weight (default 1) after checking that each key of ``weights`` is a task."""
    for key in weights:
        check_task(key, tasks, where)
    return {t: float(weights.get(t, 1.0)) for t in tasks}


def weighted_backward(losses: dict[str, "torch.Tensor"], weights: dict[str, float]) -> None:
    """``sum_t weights[t] * losses[t]``, backward (a task with weight 0 or no loss is skipped: its tail keeps grad None)."""
    total = None
    for task, loss in losses.items():
        w = float(weights.get(task, 0.0))
        if w == 0.0:
            continue
        total = loss * w if total is None else total + loss * w
    if total is not None:
        total.backward()


def step_rng(seed: int, step: int) -> Any:
    """A numpy Generator that depends only on (seed, step), so a resumed run draws the same."""
    import numpy as np

    return np.random.default_rng([int(seed), int(step)])


# ----------------------------------------------------------------------------- single


class SingleParams(api.Params):
    task: str | None = None


class Single(Strategy):
    """The single-task baseline: the model has one tail and learns one loss."""

    name = "single"
    description = "Single-task baseline: only one task's tail and loss (default: the main task)."
    Params: ClassVar[type[api.Params]] = SingleParams

    def __init__(self, params: SingleParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        self.task = params.task if params.task is not None else main_task
        check_task(self.task, self.all_tasks, "single task")

    def model_tasks(self) -> list[str]:
        return [self.task]

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        losses[self.task].backward()
        return {f"weight/{self.task}": 1.0}


# ----------------------------------------------------------------------------- joint


class JointParams(api.Params):
    weights: dict[str, Weight] = {}


class Joint(Strategy):
    """L = sum_t lambda_t * l_t on every batch, one backward pass."""

    name = "joint"
    description = "Weighted sum of all task losses on every batch: L = sum_t lambda_t * l_t."
    Params: ClassVar[type[api.Params]] = JointParams

    def __init__(self, params: JointParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        self.weights = task_weights(params.weights, self.all_tasks, "joint weights")
        if not any(self.weights.values()):
            raise ConfigError("strategies: joint weights: every task's weight is 0; at least one must be positive")

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        weighted_backward(losses, self.weights)
        return {f"weight/{t}": self.weights[t] for t in self.all_tasks if t in losses}


# ----------------------------------------------------------------------------- alternate


class AlternateParams(api.Params):
    order: Literal["round_robin", "random", "weighted"] = "round_robin"
    seed: Seed = 0
    weights: dict[str, Weight] = Field(
        {}, description="order = weighted: each step's task is drawn with probability proportional to its weight (default 1)"
    )


class Alternate(Strategy):
    """One task per batch: round robin, a seeded uniform choice, or a seeded choice proportional to ``weights``."""

    name = "alternate"
    description = "One task's loss per batch: round robin, random, or random in proportion to a weight."
    Params: ClassVar[type[api.Params]] = AlternateParams

    def __init__(self, params: AlternateParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        weights = task_weights(params.weights, self.all_tasks, "alternate weights")
        if params.weights and params.order != "weighted":
            raise ConfigError("strategies: alternate weights are used only with order = 'weighted'")
        w = list(weights.values())
        if sum(w) <= 0:
            raise ConfigError("strategies: alternate weights: every task's weight is 0; at least one must be positive")
        self.probabilities = [v / sum(w) for v in w]

    def task_at(self, step: int) -> str:
        n = len(self.all_tasks)
        if self.params.order == "round_robin":
            return self.all_tasks[step % n]
        rng = step_rng(self.params.seed, step)
        if self.params.order == "weighted":
            return self.all_tasks[int(rng.choice(n, p=self.probabilities))]
        return self.all_tasks[int(rng.integers(n))]

    def tasks_for_step(self, step: int) -> list[str]:
        return [self.task_at(step)]

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        task = self.task_at(ctx.step)
        losses[task].backward()
        return {"task": task}


# ----------------------------------------------------------------------------- uncertainty


class UncertaintyParams(api.Params):
    init: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    lr: Annotated[float | None, Field(gt=0, description="learning rate of the log-variances (default: the model's)")] = None
    regression_loss: Literal["rmse", "mse"] = Field(
        "rmse",
        description="how a regression task's loss is read: rmse is squared into the mean squared error the "
        "Gaussian likelihood is written on; mse is used as given",
    )


class Uncertainty(Strategy):
    """Kendall et al. (2018) homoscedastic uncertainty weighting with learned s_t = log sigma_t^2.

    L = sum_t C_t * exp(-s_t) * e_t + s_t / 2 with C_t = 1 and e_t = l_t for a
    classification task, C_t = 1/2 and e_t the mean squared error for a
    regression task (the Gaussian likelihood is written on the squared error:
    e_t = l_t^2 when the task's loss is an RMSE, ``regression_loss = "rmse"``,
    the default, else e_t = l_t). At the optimum of s_t, exp(s_t) = e_t
    (regression) or 2 l_t (classification). The log-variances learn with their
    own learning rate ``lr`` (default: the model's): Adam moves each by about
    its learning rate per step, so the model's rate can be far too small for
    them to reach that optimum in a short budget.
    The s_t are scalar CPU parameters; ``objective`` uses ``s.to(loss.device)``
    so autograd carries their gradient back to the CPU leaves, which the
    optimizer updates in place (this works unchanged when the model is on a GPU).
    """

    name = "uncertainty"
    description = "Learned uncertainty weights (Kendall et al.): sum_t C_t exp(-s_t) l_t + s_t / 2."
    Params: ClassVar[type[api.Params]] = UncertaintyParams

    def __init__(self, params: UncertaintyParams, tasks: list[str], main_task: str) -> None:
        super().__init__(params, tasks, main_task)
        self._log_variances: dict[str, Any] | None = None

    @property
    def log_variances(self) -> dict[str, "torch.nn.Parameter"]:
        """The s_t, created on first use (so validating a config does not import torch)."""
        if self._log_variances is None:
            import torch

            self._log_variances = {
                t: torch.nn.Parameter(torch.full((), float(self.params.init), dtype=torch.float32))
                for t in self.all_tasks
            }
        return self._log_variances

    def parameters(self) -> list[Any]:
        params = list(self.log_variances.values())
        if self.params.lr is None:
            return params
        return [{"params": params, "lr": float(self.params.lr)}]

    def factor(self, task: str, task_kinds: dict[str, str]) -> float:
        kind = task_kinds.get(task)
        if kind not in KIND_FACTOR:
            raise PluginError(
                f"strategy uncertainty: task {task!r} has kind {kind!r}; expected one of {', '.join(KIND_FACTOR)}"
            )
        return KIND_FACTOR[kind]

    def objective(self, losses: dict[str, "torch.Tensor"], task_kinds: dict[str, str]) -> "torch.Tensor":
        """The combined loss sum_t C_t * exp(-s_t) * l_t + s_t / 2 over the given losses."""
        import torch

        total = None
        for task, loss in losses.items():
            s = self.log_variances[task].to(device=loss.device, dtype=loss.dtype)
            term = self.factor(task, task_kinds) * torch.exp(-s) * self.error(task, loss, task_kinds) + s / 2
            total = term if total is None else total + term
        if total is None:
            raise ValueError("strategy uncertainty: no losses to combine")
        return total

    def error(self, task: str, loss: "torch.Tensor", task_kinds: dict[str, str]) -> "torch.Tensor":
        """The likelihood's error term e_t of a task's loss (see the class docstring)."""
        squared = task_kinds.get(task) == "regression" and self.params.regression_loss == "rmse"
        return loss * loss if squared else loss

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        self.objective(losses, ctx.task_kinds).backward()
        return self.values(ctx.task_kinds, {t: float(l.detach()) for t, l in losses.items()})

    def values(self, task_kinds: dict[str, str], losses: dict[str, float]) -> dict[str, float]:
        """s/<t>, sigma/<t> = exp(s/2), weight/<t> = C exp(-s) on e_t, and lambda/<t>: the weight the
        step's gradient puts on the task's loss as given (C exp(-s) de_t/dl_t), comparable to joint's lambdas."""
        import math

        out: dict[str, float] = {}
        for task, loss in losses.items():
            s = float(self.log_variances[task].detach())
            weight = self.factor(task, task_kinds) * math.exp(-s)
            squared = task_kinds.get(task) == "regression" and self.params.regression_loss == "rmse"
            out[f"s/{task}"] = s
            out[f"sigma/{task}"] = math.exp(s / 2)
            out[f"weight/{task}"] = weight
            out[f"lambda/{task}"] = weight * (2.0 * loss if squared else 1.0)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"log_variance": {t: float(p.detach()) for t, p in self.log_variances.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        saved = dict(state.get("log_variance", {}))
        if set(saved) != set(self.log_variances):
            raise ConfigError(
                f"strategy uncertainty: checkpoint has log-variances for {', '.join(sorted(saved)) or 'no task'}; "
                f"this run's tasks are {', '.join(self.all_tasks)}"
            )
        with torch.no_grad():
            for task, value in saved.items():
                self.log_variances[task].fill_(float(value))


# ----------------------------------------------------------------------------- per-task gradients


@dataclass
class TaskGradient:
    """One task's gradients: ``shared`` flattened over the trunk parameters, ``tail`` per tail parameter.

    ``shared_used[i]`` says whether the task's loss reached shared parameter i at all
    (an unreached one gets zeros in ``shared``).
    """

    shared: "torch.Tensor"
    shared_used: list[bool]
    tail: list["torch.Tensor | None"]


def task_gradients(losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, TaskGradient]:
    """Each task's gradients w.r.t. the shared parameters and its own tail, one autograd pass per task.

    The graph is retained until the last task's pass. Parameters that do not
    require grad are left out (of ``shared`` and ``tail`` alike).
    """
    import torch

    shared = [p for p in ctx.shared_parameters if p.requires_grad]
    names = list(losses)
    out: dict[str, TaskGradient] = {}
    for i, task in enumerate(names):
        tail = [p for p in ctx.task_parameters.get(task, []) if p.requires_grad]
        grads = torch.autograd.grad(
            losses[task], shared + tail, retain_graph=i < len(names) - 1, allow_unused=True
        )
        shared_grads = grads[: len(shared)]
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(shared_grads, shared)]
        ) if shared else torch.zeros(0)
        out[task] = TaskGradient(flat, [g is not None for g in shared_grads], list(grads[len(shared):]))
    return out


def assign_gradients(params: list["torch.nn.Parameter"], grads: list["torch.Tensor | None"]) -> None:
    """Add ``grads`` into ``.grad`` (as ``backward`` would); a None gradient leaves the parameter alone."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.detach().view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


def assign_shared_gradient(ctx: StepContext, flat: "torch.Tensor", used: list[bool] | None = None) -> None:
    """Split a flat gradient over the (grad-requiring) shared parameters and add it into their ``.grad``.

    ``used[i]`` False leaves shared parameter i's ``.grad`` untouched (no task reached it).
    """
    shared = [p for p in ctx.shared_parameters if p.requires_grad]
    if used is None:
        used = [True] * len(shared)
    chunks = flat.split([p.numel() for p in shared]) if shared else []
    assign_gradients(shared, [c if u else None for c, u in zip(chunks, used)])


def assign_tail_gradients(grads: dict[str, TaskGradient], ctx: StepContext) -> None:
    """Give each task's tail the gradients of its own loss."""
    for task, tg in grads.items():
        tail = [p for p in ctx.task_parameters.get(task, []) if p.requires_grad]
        assign_gradients(tail, tg.tail)


# ----------------------------------------------------------------------------- pcgrad


class PCGradParams(api.Params):
    seed: Seed = 0


class PCGrad(Strategy):
    """Yu et al. (2020) gradient surgery on the shared parameters.

    Each task's shared gradient g_i is projected onto the normal plane of every
    other task's gradient g_j it conflicts with (g_i . g_j < 0), taking the j in
    a random order seeded by (seed, step); the projected gradients are summed.
    Each tail gets the gradient of its own loss.
    """

    name = "pcgrad"
    description = "PCGrad gradient surgery (Yu et al. 2020): drop the conflicting components of task gradients."
    Params: ClassVar[type[api.Params]] = PCGradParams

    def backward(self, losses: dict[str, "torch.Tensor"], ctx: StepContext) -> dict[str, Any]:
        grads = task_gradients(losses, ctx)
        names = list(grads)
        flats = [grads[t].shared for t in names]
        combined, n_projections = project_conflicting(flats, step_rng(self.params.seed, ctx.step))
        used = [any(grads[t].shared_used[i] for t in names) for i in range(len(grads[names[0]].shared_used))]
        assign_shared_gradient(ctx, combined, used)
        assign_tail_gradients(grads, ctx)
        return pair_logs(names, flats, n_projections)


def project_conflicting(flats: list["torch.Tensor"], rng: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """PCGrad's projection and sum; returns (summed gradient, number of projections as a tensor).

    Projections use the other tasks' original gradients, as in the paper's
    algorithm. No host-device synchronisation happens here.
    """
    import torch

    norms2 = [g.dot(g) for g in flats]
    count = torch.zeros((), device=flats[0].device)
    total = torch.zeros_like(flats[0])
    for i, g_i in enumerate(flats):
        pc = g_i.clone()
        others = [j for j in range(len(flats)) if j != i]
        for j in rng.permutation(others) if others else []:
            g_j = flats[int(j)]
            d = pc.dot(g_j)
            conflict = d < 0
            coef = torch.where(conflict, d / norms2[int(j)], torch.zeros_like(d))
            pc.sub_(coef * g_j)
            count = count + conflict.to(count.dtype)
        total.add_(pc)
    return total, count


def pair_logs(names: list[str], flats: list["torch.Tensor"], n_projections: "torch.Tensor") -> dict[str, Any]:
    """cos/<a>/<b> of the original shared gradients for each task pair, conflicts and projections (one sync)."""
    import torch

    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    values = [n_projections.float()]
    for a, b in pairs:
        na, nb = flats[a].norm(), flats[b].norm()
        denom = na * nb
        values.append(torch.where(denom > 0, flats[a].dot(flats[b]) / denom, torch.zeros_like(denom)).float())
    numbers = torch.stack([v.to(values[0].device) for v in values]).tolist() if values else []
    out: dict[str, Any] = {"projections": float(numbers[0])}
    cos = numbers[1:]
    for (a, b), c in zip(pairs, cos):
        out[f"cos/{names[a]}/{names[b]}"] = float(c)
    out["conflicts"] = float(sum(1 for c in cos if c < 0))
    return out


# ----------------------------------------------------------------------------- registration

BUILTIN_STRATEGIES: tuple[type[Strategy], ...] = (Single, Joint, Alternate, Uncertainty, PCGrad)


@hookimpl
def register_strategies(register):
    for cls in BUILTIN_STRATEGIES:
        register(cls)
