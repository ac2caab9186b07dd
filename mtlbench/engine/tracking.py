"""Live tracking of a trial: TensorBoard event files written while it trains, and the scalars trackers receive.

``TrialTracker`` writes ``<trial dir>/tensorboard/events.out.tfevents.*`` with
torch's own ``SummaryWriter`` (it needs the ``tensorboard`` package, the
``mtlbench[tensorboard]`` extra), so ``tensorboard --logdir RUN_DIR/trials``
shows every trial of a run, one run per trial folder, while the run is going.
``epoch_scalars`` and ``final_scalars`` name the scalars (docs/results.md,
"TensorBoard"); the Ray Tune trainable reports the same names, which is what
MLflow receives through Ray's ``MLflowLoggerCallback``.

torch and tensorboard are imported only when a tracker is enabled.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

TENSORBOARD = "tensorboard"
EXTRA_HINT = "pip install 'mtlbench[tensorboard]'"


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package (what ``torch.utils.tensorboard`` writes with) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_enabled(setting: bool | str) -> bool:
    """``run.tensorboard``: ``true``, ``false`` or ``"auto"`` (on when the tensorboard package is installed)."""
    if setting == "auto":
        return tensorboard_installed()
    return bool(setting)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def epoch_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``history`` entry, by tag.

    Every ``train`` key as it is in the history (``loss/<task>``,
    ``weight/<task>``, ``lambda/<task>``, ``grad_norm/<task>``; a key without a
    ``/`` becomes ``train/<key>``), ``lr``, the epoch's evaluation metrics as
    ``eval/<task>/<metric>`` when it was evaluated, and ``time/epoch_s``.
    """
    out: dict[str, float] = {}
    for key, value in (entry.get("train") or {}).items():
        v = _number(value)
        if v is not None:
            out[key if "/" in key else f"train/{key}"] = v
    lr = _number(entry.get("lr"))
    if lr is not None:
        out["lr"] = lr
    for key, value in (entry.get("metrics") or {}).items():
        v = _number(value)
        if v is not None:
            out[f"eval/{key}"] = v
    t = _number(entry.get("time_s"))
    if t is not None:
        out["time/epoch_s"] = t
    return out


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The trial's final test metrics (the record's ``metrics``) as ``final/<task>/<metric>``."""
    return {f"final/{k}": v for k, v in ((k, _number(v)) for k, v in (metrics or {}).items()) if v is not None}


_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def mlflow_key(tag: str) -> str:
    """A tag as an MLflow metric name (MLflow allows letters, digits, ``_ - . / :`` and space): others become ``:``.

    ``train/task=segmentation`` (the alternating strategy's step count) becomes
    ``train/task:segmentation``.
    """
    return _MLFLOW_BAD.sub(":", tag)


class TrialTracker:
    """TensorBoard event files of one trial in ``log_dir``; does nothing when not enabled.

    ``enabled`` is ``run.tensorboard`` (``True``, ``False`` or ``"auto"``).
    ``info`` (the trial's identity) is written once as the text summary
    ``trial``. Event files of an earlier attempt of the trial in ``log_dir``
    are removed first: the trial starts again from epoch 1.
    """

    def __init__(self, log_dir: str | Path, enabled: bool | str = "auto", info: dict[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None
        self.step = 0
        if not tensorboard_enabled(enabled):
            return
        if not tensorboard_installed():
            from mtlbench.errors import ConfigError

            raise ConfigError(f"run.tensorboard = true needs the tensorboard package: {EXTRA_HINT}")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # installed, but not a version torch can write with
            if enabled == "auto":
                logging.getLogger("mtlbench").warning(f"no TensorBoard event files: torch.utils.tensorboard: {exc}")
                return
            from mtlbench.errors import ConfigError

            raise ConfigError(f"run.tensorboard = true, but torch.utils.tensorboard cannot be imported: {exc}") from None

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("events.out.tfevents.*"):
            old.unlink(missing_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if info:
            self.writer.add_text("trial", "```\n" + json.dumps(info, indent=2, default=str) + "\n```", 0)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def _write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # live: a running TensorBoard sees each epoch as it ends

    def epoch(self, entry: dict[str, Any]) -> None:
        """One ``history`` entry, at step ``entry["epoch"]``."""
        if self.writer is None:
            return
        self.step = int(entry.get("epoch", self.step + 1))
        self._write(epoch_scalars(entry), self.step)

    def final(self, metrics: dict[str, Any]) -> None:
        """The final test metrics, at the last epoch's step."""
        if self.writer is None:
            return
        self._write(final_scalars(metrics), self.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TrialTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
