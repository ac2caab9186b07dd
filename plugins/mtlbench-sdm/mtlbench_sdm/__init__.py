"""mtlbench plugin ``sdm``: signed distance maps of the organs as an auxiliary regression task.

The task and its encoding live in :mod:`mtlbench_sdm.sdm`; this module only
registers the task (entry point ``sdm`` in the ``mtlbench`` group).
"""

from __future__ import annotations

from mtlbench import hookimpl

from mtlbench_sdm.sdm import SdmParams, SignedDistance, band_mae_mm, grown_box, scaled_sdm, sign_dice, signed_distance

__all__ = ["SdmParams", "SignedDistance", "band_mae_mm", "grown_box", "scaled_sdm", "sign_dice", "signed_distance"]


@hookimpl
def register_tasks(register):
    register(SignedDistance)
