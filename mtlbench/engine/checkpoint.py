"""Checkpoints that prove their integrity: ``checkpoint.pt`` and its sha256 digest ``checkpoint.pt.sha256`` beside it.

The one place that writes and reads trial checkpoints. Writing serialises the
state in memory, writes the bytes atomically, then writes their digest
atomically (in ``sha256sum`` format, so ``sha256sum -c checkpoint.pt.sha256``
checks it by hand too). Reading checks the digest before ``torch.load`` sees
a byte, then loads with ``weights_only=True``.

Every failure is one line naming the file: a damaged checkpoint (digest
mismatch, truncated, empty, random bytes) or an unreadable digest is a
:class:`~mtlbench.errors.DataError`; a full disk, read-only or forbidden
folder while saving is a :class:`~mtlbench.errors.StorageError`, and leaves
neither a partial checkpoint nor a stale digest behind.

A checkpoint without a digest (written before digests existed, or a save
interrupted between the two renames) is loaded with a warning: its integrity
cannot be proved, but ``torch.load`` still rejects structural damage.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any

from mtlbench.errors import DataError
from mtlbench.fsutil import atomic_path, storage_errors, write_text

LOG = logging.getLogger("mtlbench.engine")
DIGEST_SUFFIX = ".sha256"
_DIGEST_LINE = re.compile(r"^([0-9a-f]{64})\b")


def digest_path(path: str | Path) -> Path:
    """Where the digest of checkpoint ``path`` lives: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (torch.save) to ``path`` and its sha256 to ``<path>.sha256``, each atomically.

    The old digest goes first, so an interrupted save leaves a checkpoint
    without a digest (loaded with a warning), never one with a wrong digest.
    """
    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with storage_errors(digest_path(path)):
        digest_path(path).unlink(missing_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        tmp.write_bytes(data)
    write_text(digest_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state saved at ``path``, after checking its digest (DataError naming the file when anything is wrong)."""
    path = Path(path)
    data = _read_bytes(path)
    expected = expected_digest(path)
    if expected is None:
        LOG.warning("%s: no %s beside it, so its integrity cannot be checked; loading it anyway", path, digest_path(path).name)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{path}: checkpoint is damaged (its sha256 does not match {digest_path(path).name}); train the trial again")
    return _deserialise(path, data, map_location)


def expected_digest(path: str | Path) -> str | None:
    """The sha256 hex recorded for checkpoint ``path``, or None when it has no digest file."""
    digest = digest_path(path)
    try:
        text = digest.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"{digest}: cannot read ({exc.strerror or exc})") from None
    match = _DIGEST_LINE.match(text.strip().lower())
    if match is None:
        raise DataError(f"{digest}: not a sha256 digest line; delete it to load {Path(path).name} unchecked")
    return match.group(1)


def _read_bytes(path: Path) -> bytes:
    """The checkpoint's bytes (DataError when it is missing or unreadable)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None


def _deserialise(path: Path, data: bytes, map_location: Any) -> dict[str, Any]:
    """torch.load of ``data`` (weights only); any failure or a state without ``model`` is a DataError."""
    import torch

    if not data:
        raise DataError(f"{path}: checkpoint is empty")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ValueError, ... on damage
        raise DataError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{path}: not an mtlbench checkpoint (no 'model' state)")
    return state


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first non-empty line (at most 200 characters)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
