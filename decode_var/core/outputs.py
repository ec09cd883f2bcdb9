"""Pre-flight checks of a command's outputs: found before the work starts, not after it (issue 27).

Every command line calls :func:`check_outputs` before it loads a model or reads a frame. For each file it
will write:

- the folder it goes in exists, or can be made: the nearest existing folder above it is a folder, not a
  file, and a file can be created there (a real file is created and removed: ``os.access`` says yes to
  root even where a write fails, e.g. on a read-only mount);
- the target is not an existing folder;
- the target is not one of the command's inputs (``--model``, ``-p``, ``--frames``, ...), compared as
  files (links and ``..`` included): a fit with ``--out model.pt`` would replace the model;
- the free space of the folder covers ``expected_bytes``, the caller's estimate of what it writes.

Each failure is an :class:`~decode_var.core.errors.OutputError` (exit status 2) whose one line names the
file, the problem and the fix. A failure during the write itself (a disk that fills meanwhile) is turned
into the same error by :func:`decode_var.core.atomic.atomic_write`, which keeps the previous file.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
from typing import Iterable, Mapping, Optional, Union

from decode_var.core.errors import OutputError, os_error_text

__all__ = ["check_outputs", "check_output_folder", "check_free_space", "existing_folder", "write_failed",
           "format_bytes"]

PathLike = Union[str, os.PathLike]


def check_outputs(outputs: Iterable[PathLike], inputs: Optional[Mapping[str, Optional[PathLike]]] = None,
                  expected_bytes: int = 0, flag: str = "--out") -> None:
    """Raise :class:`OutputError` if any of ``outputs`` (files to be written) cannot or must not be written.

    Args:
        outputs: the files the command will write (folders above them may not exist yet).
        inputs: the command's input files by flag, e.g. ``{"--model": "model.pt"}``; None entries are skipped.
        expected_bytes: about how much the outputs take together; the free space of each folder must cover it.
        flag: the option that chooses the outputs, named in the messages.
    """
    outputs = [pathlib.Path(p) for p in outputs]
    inputs = {k: pathlib.Path(v) for k, v in (inputs or {}).items() if v is not None}
    folders = {}
    for out in outputs:
        if out.is_dir():
            raise OutputError(f"cannot write {out}: it is a folder. Give a file name for {flag}.")
        for name, inp in inputs.items():
            if _same_file(out, inp):
                alias = "" if str(out) == str(inp) else f" ({inp})"
                raise OutputError(f"cannot write {out}: it is the {name} file{alias}, which would be destroyed. "
                                  f"Choose another {flag}.")
        folders.setdefault(existing_folder(out, flag), out)
    for folder, out in folders.items():
        _check_writable(folder, out, flag)
        check_free_space(folder, expected_bytes, flag)


def check_output_folder(folder: PathLike, expected_bytes: int = 0, flag: str = "--out") -> pathlib.Path:
    """Raise :class:`OutputError` unless files can be written in ``folder`` (made if missing); returns the
    nearest existing folder (``folder`` itself, or the one above it where it will be made)."""
    folder = pathlib.Path(folder)
    existing = _nearest_folder(folder, [folder, *folder.parents], flag)
    _check_writable(existing, folder, flag)
    check_free_space(existing, expected_bytes, flag)
    return existing


def existing_folder(path: PathLike, flag: str = "--out") -> pathlib.Path:
    """The nearest existing folder above ``path`` (where its missing folders would be made).

    Raises:
        OutputError: something above ``path`` is a file, not a folder.
    """
    path = pathlib.Path(path)
    return _nearest_folder(path, [path.parent, *path.parent.parents], flag)


def _nearest_folder(target: pathlib.Path, candidates: list, flag: str) -> pathlib.Path:
    for folder in candidates:
        if folder.is_dir():
            return folder
        if folder.exists() or folder.is_symlink():  # a file, or a link to nowhere
            raise OutputError(f"cannot write {target}: {folder} is a file, not a folder. Choose another {flag}.")
    return pathlib.Path(target.anchor or ".")


def check_free_space(folder: PathLike, expected_bytes: int, flag: str = "--out") -> None:
    """Raise :class:`OutputError` if ``folder`` has less free space than ``expected_bytes``."""
    if expected_bytes <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < expected_bytes:
        raise OutputError(f"not enough free space in {folder}: {format_bytes(free)} free, the output needs about "
                          f"{format_bytes(expected_bytes)}. Free some space or choose another {flag}.")


def write_failed(path: PathLike, err: OSError) -> OutputError:
    """The :class:`OutputError` for a write of ``path`` that failed with ``err`` (the old file is kept)."""
    if isinstance(err, OutputError):
        return err
    path = pathlib.Path(path)
    kept = " (the previous file is unchanged)" if path.is_file() else ""
    out = OutputError(f"could not write {path}: {os_error_text(err)}{kept}.")
    out.errno = err.errno  # not .filename: OSError's str() would then replace the message
    return out


def format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def _check_writable(folder: pathlib.Path, out: pathlib.Path, flag: str) -> None:
    probe = folder / f".decode-var-write-check.{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise OutputError(f"cannot write {out}: the folder {folder} is not writable ({os_error_text(err)}). "
                          f"Choose another {flag}, or make the folder writable.") from None
    try:
        os.unlink(probe)
    except OSError:
        pass
