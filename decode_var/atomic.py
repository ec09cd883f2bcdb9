"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one.

The content is written to a temporary file in the target's folder (same file system, so the final
``os.replace`` is an atomic rename), flushed to disk with fsync, then renamed over the target. On error
the temporary file is removed and the old target, if any, is left untouched.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save"]


def atomic_write(path: Union[str, os.PathLike], writer_fn: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``writer_fn(tmp_path)`` to write the content, then move it atomically to ``path``.

    ``writer_fn`` receives a path (not an open file) so that libraries that open files themselves
    (h5py, torch.save, tifffile) can be used. The temporary name keeps the target's suffix, because
    some writers (DECODE's ``EmitterSet.save``) choose the format by it. Returns ``path`` as a Path.
    """
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        # mkstemp makes the file private (0600); give the result the usual permissions instead
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        writer_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str, encoding: str = "utf-8") -> pathlib.Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding=encoding))


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> pathlib.Path:
    """``torch.save(obj, path)`` atomically (a crash mid-save leaves the previous checkpoint intact)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> pathlib.Path:
    """``torch.save(obj, path)`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _fsync_dir(folder: pathlib.Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
