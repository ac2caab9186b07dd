"""The network: the shared U-Net trunk, the multi-task model (trunk + one tail per task) and ``build_model``.

The trunk follows the study's U-Net (docs/reproducing.md): ``len(widths)``
scale levels, blocks of 2 x (3x3 conv + batch norm + ReLU), 2x2 max pooling
down, 2x2 transposed convolutions up and skip concatenation. The decoder goes
back up to ``widths[1]``; a last transposed convolution to ``widths[0]``
channels is concatenated with the first skip, and that full-resolution
concatenation (``2 * widths[0]`` channels) is the trunk's output. The study's
"2 x 64 3x3 convs then 1x1" tails therefore hold the last decoder block: each
task's tail (built by its head plugin) starts from the concatenation.

Parameters use PyTorch's default initialisation, so a model built after
``torch.manual_seed(s)`` is the same for the same ``s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtlbench.errors import ConfigError
from mtlbench.config import pooling_divisor

if TYPE_CHECKING:  # pragma: no cover
    from mtlbench.api import Head, Task
    from mtlbench.config import Config


def conv_block(in_channels: int, out_channels: int, convs: int = 2) -> nn.Sequential:
    """``convs`` x (3x3 conv, batch norm, ReLU); the conv has no bias (batch norm follows)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class UNetTrunk(nn.Module):
    """The shared U-Net: encoder, bottom, decoder up to ``widths[1]``, last up-conv + first skip.

    ``forward(x)`` takes (B, in_channels, H, W) with H and W divisible by
    ``self.divisor = 2 ** (len(widths) - 1)`` and returns (B, 2 * widths[0], H, W).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], coordinates: bool = False) -> None:
        super().__init__()
        self.coordinates = bool(coordinates)
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"model.widths must list at least 2 positive widths, got {widths}")
        self.in_channels = int(in_channels)
        self.widths = widths
        self.levels = len(widths)
        self.divisor = pooling_divisor(widths)
        self.out_channels = 2 * widths[0]
        self.encoders = nn.ModuleList()
        prev = self.in_channels + (2 if self.coordinates else 0)
        for w in widths[:-1]:
            self.encoders.append(conv_block(prev, w))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = conv_block(widths[-2], widths[-1])
        # Decoder levels n-2 .. 1: up-conv to widths[i], concat skip i, block back to widths[i].
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(self.levels - 2, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.decoders.append(conv_block(2 * widths[i], widths[i]))
        self.final_up = nn.ConvTranspose2d(widths[1], widths[0], 2, stride=2)

    def check_size(self, size: Sequence[int]) -> None:
        """Raise ConfigError unless an (H, W) slice fits the trunk's pooling levels."""
        h, w = int(size[0]), int(size[1])
        if h % self.divisor or w % self.divisor:
            raise ConfigError(
                f"preprocess.slice_size {h}x{w} must be divisible by {self.divisor} "
                f"(2 ** (len(model.widths) - 1) for model.widths {self.widths})"
            )

    def bottom_size(self, size: Sequence[int]) -> tuple[int, int]:
        """The (H, W) of the coarsest level for an input slice of ``size``."""
        self.check_size(size)
        return int(size[0]) // self.divisor, int(size[1]) // self.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_size(x.shape[-2:])
        if self.coordinates:
            x = torch.cat([x, coordinate_channels(x)], dim=1)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[1:])):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return torch.cat([skips[0], self.final_up(x)], dim=1)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) row and column positions in [-1, 1] (CoordConv, Liu et al. 2018).

    They let a small network tell the left from the right organ of a pair
    without the receptive field of a deep one.
    """
    b, _, h, w = x.shape
    rows = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([rows, cols], dim=1)


class MultiTaskModel(nn.Module):
    """A trunk and one tail per task label; ``forward(x)`` returns {label: tail output}.

    ``forward(x, tasks=[...])`` runs only the named tails (e.g. the task of an
    alternating step); the trunk always runs.
    """

    def __init__(self, trunk: UNetTrunk, tails: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for label in tails:
            if not label or "." in label:
                raise ConfigError(f"tasks.{label}: a task label must be non-empty and must not contain '.'")
        self.trunk = trunk
        self.tails = nn.ModuleDict(dict(tails))

    @property
    def task_labels(self) -> list[str]:
        return list(self.tails.keys())

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.forward_with_features(x, tasks)[0]

    def forward_with_features(
        self, x: torch.Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The tails' outputs and the trunk's output they were computed from (the shared features)."""
        features = self.trunk(x)
        labels = self.task_labels if tasks is None else list(tasks)
        return {label: self.tails[label](features) for label in labels}, features

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The layers that produce the features: the last up-convolution and the first block's last conv + norm."""
        first_block_tail = [m for m in self.trunk.encoders[0] if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-2:]
        params = list(self.trunk.final_up.parameters())
        for m in first_block_tail:
            params += list(m.parameters())
        return params

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {label: list(tail.parameters()) for label, tail in self.tails.items()}


def build_model(cfg: "Config", tasks: Mapping[str, "Task"], heads: Mapping[str, "Head"]) -> MultiTaskModel:
    """The trunk from ``cfg.model`` and one tail per task, built by ``heads[label].build``.

    ``tasks`` and ``heads`` map task labels to instantiated plugins; the
    single-task baseline is the same call with only the main task.
    """
    missing = [label for label in tasks if label not in heads]
    if missing:
        raise ConfigError(f"tasks.{missing[0]}: no head was given for this task")
    trunk = UNetTrunk(cfg.model.in_channels, cfg.model.widths, cfg.model.coordinates)
    trunk.check_size(cfg.preprocess.slice_size)
    tails = {label: heads[label].build(trunk.out_channels, task.out_channels()) for label, task in tasks.items()}
    return MultiTaskModel(trunk, tails)
