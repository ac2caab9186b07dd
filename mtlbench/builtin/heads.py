"""The built-in head ``conv`` (a stack of 3x3 conv + BN + ReLU, then a 1x1 conv), registered through ``register_heads``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mtlbench import hookimpl
from mtlbench.api import Head, Params

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class ConvHeadParams(Params):
    width: int = Field(64, ge=1, description="channels of the 3x3 convolutions")
    convs: int = Field(2, ge=0, description="number of 3x3 conv + BN + ReLU layers before the 1x1 conv")
    batch_norm: bool = Field(True, description="batch norm after each 3x3 conv")


class ConvHead(Head):
    """The study's tail: ``convs`` x (3x3 conv, batch norm, ReLU), then a 1x1 conv to the task's channels."""

    name = "conv"
    description = "convs x (3x3 conv + BN + ReLU) then a 1x1 conv (the study's 2 x 64 tail)"
    Params = ConvHeadParams

    def build(self, in_channels: int, out_channels: int) -> "nn.Module":
        from torch import nn

        p: ConvHeadParams = self.params  # type: ignore[assignment]
        layers: list[nn.Module] = []
        prev = int(in_channels)
        for _ in range(p.convs):
            layers.append(nn.Conv2d(prev, p.width, 3, padding=1, bias=not p.batch_norm))
            if p.batch_norm:
                layers.append(nn.BatchNorm2d(p.width))
            layers.append(nn.ReLU(inplace=True))
            prev = p.width
        layers.append(nn.Conv2d(prev, int(out_channels), 1))
        return nn.Sequential(*layers)


@hookimpl
def register_heads(register):
    register(ConvHead)
