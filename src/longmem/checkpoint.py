"""Checkpoint files that are written atomically and read back whole, or not at all.

:func:`save` writes ``torch.save``'s file under a temporary name in the target's directory, flushes
it to disk and renames it into place, so a crash or ``kill -9`` at any moment leaves either the old
file or the new one, never a partial file. :func:`load` checks the file before unpickling it: every
record of ``torch.save``'s zip archive carries a CRC-32, which it verifies, so a truncated, empty,
bit-flipped or foreign file raises :class:`CheckpointError` naming the file instead of loading
wrong numbers or failing deep inside ``torch.load``.

The files are ordinary ``torch.save`` files: ``torch.load`` reads them, and :func:`load` reads any
``torch.save`` file (zip format, the default since torch 1.6).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load", "save"]

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a ``torch.save`` file."""


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def save(path: PathLike, obj: Any) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` holds the old file or the new, never a mix."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    # a fresh name beside the target (same file system, so the rename is atomic); created as open()
    # would, with the umask's permissions (tempfile.mkstemp would make it private to its owner)
    tmp = str(directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def verify(path: PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` archive whose every
    record matches its CRC-32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted write?")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("/data.pkl") for name in names):
                raise CheckpointError(f"checkpoint {str(path)!r} is a zip archive but not a torch.save file")
            bad = archive.testzip()
            # torch's reader (miniz) takes an entry whose MS-DOS directory attribute is set for a
            # directory and reads no data for it: a flipped bit there would load wrong numbers
            flagged = [i.filename for i in archive.infolist() if i.external_attr & 0x10]
            if flagged:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} is corrupt: record {flagged[0]!r} is marked a directory"
                )
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt, "
            f"or not a torch.save file: {err}"
        ) from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: record {bad!r} fails its CRC-32 check")


def load(path: PathLike, *, map_location: Any = None, weights_only: bool = True) -> Any:
    """``torch.load(path)`` after :func:`verify`; any failure to read is a :class:`CheckpointError`.

    ``weights_only=True`` (the default, as ``torch.load``'s) unpickles tensors, numbers, strings and
    containers only, which is all an optimizer's or a model's state dict holds.
    """
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} could not be loaded: {err}") from err
