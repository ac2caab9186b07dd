"""The exceptions mtlbench raises for bad input, each with its CLI exit code.

The CLI prints ``str(error)`` as one line on stderr and exits with
``error.exit_code``: 2 for usage, configuration and plugin errors, 1 for data,
trial and storage errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MtlbenchError(Exception):
    exit_code = 1


class ConfigError(MtlbenchError):
    """A configuration file, profile or override is wrong."""

    exit_code = 2


class PluginError(MtlbenchError):
    """A plugin name is unknown, duplicated or its registration is invalid."""

    exit_code = 2


class DataError(MtlbenchError):
    """Input data (volumes, masks, landmarks, manifests, caches) is wrong."""

    exit_code = 1


class TrialError(MtlbenchError):
    """A trial failed or diverged."""

    exit_code = 1


class StorageError(MtlbenchError):
    """A file or folder cannot be written or created: disk full, permission denied, read-only file system.

    Raised by :mod:`mtlbench.fsutil` (which names the path mtlbench was writing)
    instead of a raw ``OSError``; the message is one line.
    """

    exit_code = 1
