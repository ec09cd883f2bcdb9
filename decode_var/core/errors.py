"""Error types of decode-var.

Every error a user can cause (a bad param file, a wrong tensor shape, a missing calibration,
a corrupt checkpoint or TIFF) is raised as a :class:`DecodeVarError` subclass whose message
names the problem and the fix. Nothing deep inside the package should surface as a bare
KeyError/TypeError for user input.

The command lines end with one line on stderr and an exit status (:func:`exit_status`): 0 done,
2 an error the user can fix (every :class:`DecodeVarError`, and any other ``OSError``), 130 stopped by
Ctrl-C (never a traceback). ``decode-var-train`` adds 3 for a diverged run.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

#: Exit statuses of the command lines.
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class DecodeVarError(Exception):
    """Base class of all errors raised on purpose by decode-var."""


class ParamError(DecodeVarError, ValueError):
    """The parameter file is unreadable or holds an invalid value.

    The message names the key (``Section.key``) and says how to fix it.
    """


class BackendError(DecodeVarError, ImportError):
    """The requested backend cannot be used (e.g. ``decode`` asked for but not importable)."""


class ShapeError(DecodeVarError, ValueError):
    """A tensor does not have the shape a component expects."""


class CheckpointError(DecodeVarError, RuntimeError):
    """A model or checkpoint file is missing, truncated, corrupt or unsafe to load."""


class InputDataError(DecodeVarError, ValueError):
    """Frames or emitter files given by the user are missing, corrupt or malformed."""


class OutputError(DecodeVarError, OSError):
    """An output cannot be written: its folder is missing, read-only or full, or it would replace an input.

    Also an ``OSError``, so that code that tolerates a failed write (``except OSError``) still does.
    ``errno`` is that of the failure, when there was one.
    """


class DeviceError(DecodeVarError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def os_error_text(err: OSError) -> str:
    """The reason of an ``OSError`` in words (``No space left on device``), without errno numbers or paths.

    The system's words for the errno come first: h5py, for one, puts a many-line report in ``strerror``.
    """
    if err.errno:
        return os.strerror(err.errno)
    if err.strerror:
        return err.strerror.strip().splitlines()[0][:200]
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else "") or type(err).__name__


def exit_status(prog: str, err: BaseException, kept: Optional[str] = None, context: str = "") -> int:
    """Print the one line a command ends with after ``err`` and return its exit status.

    ``kept`` says what a Ctrl-C left behind (e.g. "nothing was written"); a :class:`DecodeVarError`
    prints its message after ``context``; any other ``OSError`` prints the file and the reason, never a
    traceback.
    """
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C, or TrainingInterrupted (also a DecodeVarError)
        detail = str(err) if isinstance(err, DecodeVarError) else ""
        print(f"{prog}: interrupted" + "".join(f"; {t}" for t in (detail, kept) if t), file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(err, DecodeVarError):
        print(f"{prog}: error: {context}{err}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        print(f"{prog}: error: {context}{where}{os_error_text(err)}", file=sys.stderr)
        return EXIT_ERROR
    raise err
