"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one.

The content is written to a temporary file in the target's folder (same file system, so the final
``os.replace`` is an atomic rename), flushed to disk with fsync, then renamed over the target. On error
the temporary file is removed and the old target, if any, is left untouched; a failure of the file system
(a full disk, a read-only folder) is raised as :class:`~decode_var.core.errors.OutputError` naming the file
and the reason, e.g. "could not write em.h5: No space left on device".

A process killed during a write (SIGKILL, power loss) leaves its temporary file
(``.<stem>.<random>.tmp<suffix>``, hidden) next to the intact target; readers never look at it and
:func:`remove_stale_temporaries` deletes such leftovers once nobody has written to them for a while.
"""
from __future__ import annotations

import glob
import os
import pathlib
import secrets
import time
from typing import Callable, Union

import torch

from decode_var.core.outputs import write_failed

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save", "temporaries",
           "remove_stale_temporaries"]


def atomic_write(path: Union[str, os.PathLike], writer_fn: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``writer_fn(tmp_path)`` to write the content, then move it atomically to ``path``.

    ``writer_fn`` receives a path (not an open file) so that libraries that open files themselves
    (h5py, torch.save, tifffile) can be used. The temporary name keeps the target's suffix, because
    some writers (DECODE's ``EmitterSet.save``) choose the format by it. Returns ``path`` as a Path.

    Raises:
        OutputError: (an ``OSError``) the write failed in the file system; ``path`` is as it was.
    """
    path = pathlib.Path(path)
    try:
        return _atomic_write(path, writer_fn)
    except OSError as err:
        raise write_failed(path, err) from err


def _atomic_write(path: pathlib.Path, writer_fn: Callable[[pathlib.Path], None]) -> pathlib.Path:
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    keep_mode = path.stat().st_mode & 0o777 if path.exists() else None
    mode = keep_mode if keep_mode is not None else 0o666  # a new file: the usual permissions after the umask
    tmp = None
    try:
        # The temporary file is created inside the try and its name is known before it exists: an
        # exception at any instant (a second Ctrl-C raises wherever the main thread is) removes it again.
        while tmp is None:
            tmp = folder / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            except FileExistsError:  # another writer's temporary file: not ours to remove, pick another name
                tmp = None
        if keep_mode is not None:
            os.chmod(tmp, keep_mode)  # the replaced file keeps its permissions, whatever the umask
        writer_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
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
    def write(tmp):
        # through a Python file: a full disk is then an OSError (ENOSPC), not torch's "unexpected pos"
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def temporaries(path: Union[str, os.PathLike]) -> list[pathlib.Path]:
    """Temporary files of (possibly interrupted) atomic writes of ``path``, sorted by name."""
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    pattern = f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def remove_stale_temporaries(path: Union[str, os.PathLike], min_age_s: float = 600.0) -> list[pathlib.Path]:
    """Delete the leftovers of interrupted atomic writes of ``path``; returns what was deleted.

    Only files not modified for ``min_age_s`` seconds are deleted: a write in progress (another process,
    another rank) keeps touching its file, an abandoned one does not.
    """
    removed = []
    now = time.time()
    for tmp in temporaries(path):
        try:
            if now - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # removed by someone else meanwhile, or not ours to remove
            pass
    return removed


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
