"""The built-in synthetic abdominal-CT phantom: the generator behind the ``phantom`` dataset source.

It owns everything about the phantom data set: the painted anatomy (``canvas``, ``anatomy``), the
CT intensities (``intensity``), the landmarks and their corruption (``landmarks``), one patient in
memory (``patient``) and the files of a data set, written in parallel and published atomically
(``generate``). docs/phantom.md describes what it models and how to use it.
"""

from __future__ import annotations

from mtlbench.builtin.phantom.canvas import Tissue
from mtlbench.builtin.phantom.generate import (
    MANIFEST_COLUMNS,
    MARKER,
    PHANTOM_VERSION,
    default_workers,
    ensure_phantom,
    generate_phantom,
    phantom_complete,
)
from mtlbench.builtin.phantom.intensity import HU_RANGE, TISSUE_HU
from mtlbench.builtin.phantom.landmarks import LANDMARKS, corrupt_landmarks
from mtlbench.builtin.phantom.patient import ORGANS, PhantomInfo, PhantomPatient, patient_id, phantom_patient

__all__ = [
    "HU_RANGE",
    "LANDMARKS",
    "MANIFEST_COLUMNS",
    "MARKER",
    "ORGANS",
    "PHANTOM_VERSION",
    "TISSUE_HU",
    "PhantomInfo",
    "PhantomPatient",
    "Tissue",
    "corrupt_landmarks",
    "default_workers",
    "ensure_phantom",
    "generate_phantom",
    "patient_id",
    "phantom_complete",
    "phantom_patient",
]
