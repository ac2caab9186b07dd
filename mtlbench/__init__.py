"""mtlbench: benchmarking multi-task learning for medical image segmentation.

Plugin authors need ``hookimpl`` (to mark hook implementations) and the base
classes in ``mtlbench.api``.
"""

from mtlbench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
