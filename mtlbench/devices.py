"""The one place that decides devices, thread counts and the training step's numerics (``step_settings``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any


def gpu_available() -> bool:
    """True when torch sees a CUDA device.

    Without an NVIDIA driver (no /dev/nvidia* device, no nvidia-smi) the answer
    is False without importing torch, which keeps ``config show`` fast.
    """
    import glob
    import shutil

    if not glob.glob("/dev/nvidia[0-9]*") and shutil.which("nvidia-smi") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_device(preference: str = "auto") -> str:
    """'cuda' when asked for or available (auto), else 'cpu'."""
    if preference == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if preference == "cuda":
        from mtlbench.errors import ConfigError

        raise ConfigError("train.device = 'cuda', but torch sees no CUDA device")
    return "cpu"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where that is not known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(cpus: float | None) -> int:
    """Set torch's intra-op threads to the trial's CPU share (at least 1); return it."""
    import torch

    n = max(1, int(math.floor(cpus))) if cpus else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def memory_format(device: str, train_cfg: Any = None):
    """The model's and inputs' memory format for ``device``: ``step_settings(device, train_cfg).memory_format``.

    Without ``train_cfg`` the ``[train]`` defaults decide (channels-last on CPU,
    and on a GPU under bf16 autocast); pass the trial's ``[train]`` so that a
    ``train.channels_last`` switch is honoured too.
    """
    return step_settings(device, train_cfg).memory_format


# ----------------------------------------------------------------------------- the training step's numerics

#: /proc/cpuinfo flags of native bfloat16 arithmetic on x86 (oneDNN uses them for bf16 convolutions).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def read_cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (its first ``flags`` line); None where there is none.

    Tests monkeypatch this to decide for CPUs other than the one they run on.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bfloat16 on this CPU, why): an AMX or AVX-512 BF16 flag, and torch built with oneDNN.

    Without native support autocast still runs in bfloat16, but oneDNN emulates it
    (or ATen's reference kernels run), which is slower than float32 (benchmarks/perf/bench_precision.py).
    Without /proc/cpuinfo (macOS, Windows) torch's own CPU probe answers.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn), so bf16 convolutions would not be native"
    flags = read_cpu_flags()
    if flags is None:
        probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        if any(p is not None and p() for p in probes):
            return True, "torch reports AMX or AVX-512 BF16 on this CPU"
        return False, "no /proc/cpuinfo, and torch reports neither AMX nor AVX-512 BF16"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, f"the CPU has neither {' nor '.join(CPU_BF16_FLAGS)} (/proc/cpuinfo)"


def cuda_bf16_support() -> tuple[bool, str]:
    """(native bfloat16 on the current CUDA device, why); emulated bf16 (before Ampere) does not count."""
    import torch

    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, "the GPU supports bf16 natively (torch.cuda.is_bf16_supported)"
    return False, "the GPU has no native bf16 (torch.cuda.is_bf16_supported(including_emulation=False) is False)"


@dataclass(frozen=True)
class StepSettings:
    """How a training step runs on one device; decided by :func:`step_settings`.

    ``autocast_dtype``: None (float32 throughout) or ``torch.bfloat16``, the
    autocast dtype of the training forward pass (the trainer hands the tasks'
    losses float32 outputs; weights, gradients, optimizer state and
    evaluation stay float32). ``channels_last``: the
    model's and inputs' memory format. ``compile``: ``torch.compile`` the trunk
    and tails. ``fused_optimizer``: Adam's fused kernel (``fused=True``: one
    pass over all parameters instead of a Python loop over tensors).
    ``reason`` holds one sentence per choice (keys ``precision``,
    ``channels_last``, ``compile``, ``fused_optimizer``).
    """

    device: str
    autocast_dtype: Any
    channels_last: bool
    compile: bool
    fused_optimizer: bool = False
    reason: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def precision(self) -> str:
        """"fp32", or "bf16" / "fp16" for the autocast dtype."""
        if self.autocast_dtype is None:
            return "fp32"
        return {"bfloat16": "bf16", "float16": "fp16"}.get(str(self.autocast_dtype).removeprefix("torch."), "?")

    @property
    def memory_format(self) -> Any:
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> Any:
        """The context for the forward pass and the losses: ``torch.autocast``, or a no-op in float32."""
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)

    def to_record(self) -> dict[str, Any]:
        """What results.json records (``step_settings`` of a trial)."""
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "fused_optimizer": self.fused_optimizer,
            "reason": dict(self.reason),
        }


def _switch(train_cfg: Any, key: str, default: Any = "auto") -> Any:
    return getattr(train_cfg, key, default) if train_cfg is not None else default


def step_settings(device: str, train_cfg: Any = None) -> StepSettings:
    """The training step's numerics for ``device`` ("cpu", "cuda", "cuda:1") from ``[train]``'s switches.

    ``train.precision`` ("auto" | "fp32" | "bf16"), ``train.channels_last`` and
    ``train.compile`` ("auto" | true | false); ``train_cfg=None`` means all "auto".

    - precision auto: bf16 autocast where the device has native bf16 (a CPU
      with AMX or AVX-512 BF16, a GPU with ``torch.cuda.is_bf16_supported``),
      else fp32. "bf16" on a device without it is a one-line ConfigError.
      fp16 is not offered: it needs loss scaling, which strategies that take
      per-task gradients (pcgrad, gradnorm, torchjd) would each have to undo.
    - channels_last auto: on for CPU (the ``cpu`` profile's step is 4-20%
      faster in it; benchmarks/perf/bench_precision.py, which also shows the
      full protocol's widths 1.5-1.9x *slower* channels-last on an AVX2 CPU,
      so set false there), on a GPU only with bf16 autocast (cuDNN's
      tensor-core convolutions are channels-last; in fp32 the old contiguous
      default stays, as nothing was measured on a GPU).
    - compile auto: off. On CPU compiling took 32-64 s in a fresh process
      (3 s with inductor's disk cache warm) and saved 2-7% of a 50 ms step,
      i.e. about a second of a ``cpu``-profile trial; set
      ``train.compile = true`` for long GPU trials.
    """
    from mtlbench.errors import ConfigError

    kind = device.split(":")[0]
    precision = _switch(train_cfg, "precision")
    reason: dict[str, str] = {}
    autocast = None
    if precision == "fp32":
        reason["precision"] = "train.precision = 'fp32'"
    elif kind in ("cpu", "cuda"):
        import torch

        native, why = cpu_bf16_support() if kind == "cpu" else cuda_bf16_support()
        if precision == "bf16" and not native:
            raise ConfigError(f"train.precision = 'bf16', but {why}; use 'auto' or 'fp32'")
        if native:
            autocast = torch.bfloat16
            asked = " (train.precision = 'bf16')" if precision == "bf16" else ""
            reason["precision"] = f"bf16 autocast: {why}{asked}"
        else:
            reason["precision"] = f"fp32: {why}"
    elif precision == "bf16":
        raise ConfigError(f"train.precision = 'bf16' is supported on cpu and cuda, not on {device!r}")
    else:
        reason["precision"] = f"fp32: no bf16 rule for device {device!r}"

    cl = _switch(train_cfg, "channels_last")
    if isinstance(cl, bool):
        channels_last = cl
        reason["channels_last"] = f"train.channels_last = {str(cl).lower()}"
    elif kind == "cpu":
        channels_last = True
        reason["channels_last"] = "on: the cpu profile's step is 4-20% faster channels-last (bench_precision.py)"
    elif kind == "cuda" and autocast is not None:
        channels_last = True
        reason["channels_last"] = "on: cuDNN's bf16 tensor-core convolutions use channels-last"
    else:
        channels_last = False
        reason["channels_last"] = "off: contiguous in fp32 on this device (channels-last not measured here)"

    comp = _switch(train_cfg, "compile")
    if isinstance(comp, bool):
        compile_ = comp
        reason["compile"] = f"train.compile = {str(comp).lower()}"
    else:
        compile_ = False
        reason["compile"] = "off: compiling costs more per trial process than a trial saves (bench_precision.py)"

    fused = kind in ("cpu", "cuda")
    reason["fused_optimizer"] = (
        "fused Adam: one kernel over all parameters (cpu profile: 0.7 vs 3.1 ms per step, docs/performance.md)"
        if fused else f"Adam's per-tensor loop: no fused kernel is assumed on {device!r}"
    )
    return StepSettings(device, autocast, channels_last, compile_, fused, reason)


def deterministic_algorithms(on: bool = True, *, compiling: bool = False) -> None:
    """``torch.use_deterministic_algorithms(on, warn_only=True)`` without importing inductor when not compiling.

    The public function imports ``torch._inductor`` (to set its
    ``deterministic`` flag), which costs about 3 s in a fresh trial process;
    the flag matters only to compiled code, so it is set only with ``compiling``.
    """
    import torch

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compiling or setter is None:
        torch.use_deterministic_algorithms(on, warn_only=True)
    else:
        setter(on, warn_only=True)


#: Training slices are kept on a GPU when they take at most this fraction of its free memory.
RESIDENT_FRACTION = 0.25


def resident_on_device(device: str, nbytes: int, free_bytes: int | None = None) -> bool:
    """Whether a trial's training slices (``nbytes``) should live on ``device`` for the whole trial.

    Only on a GPU, and only when they take at most ``RESIDENT_FRACTION`` of its
    free memory (``torch.cuda.mem_get_info``, or ``free_bytes``), so the model,
    activations and other trials packed on the same GPU keep the rest. Batches
    are then gathered and augmented on the GPU with no host-to-device copy per
    step. Never measured on a GPU in this project (docs/performance.md).
    """
    if not device.startswith("cuda"):
        return False
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= RESIDENT_FRACTION * free_bytes
