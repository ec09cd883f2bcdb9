"""Error types of decode-var.

Every error a user can cause (a bad param file, a wrong tensor shape, a missing calibration,
a corrupt checkpoint or TIFF) is raised as a :class:`DecodeVarError` subclass whose message
names the problem and the fix. Nothing deep inside the package should surface as a bare
KeyError/TypeError for user input.
"""


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
