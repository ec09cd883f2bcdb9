"""Device names from a param file -> torch devices, with DECODE's fallback to the CPU when CUDA is absent."""
from __future__ import annotations

import torch

from decode_var.core.errors import ParamError
from decode_var.core.log import warn


def resolve_device(name, key: str = "Hardware.device_simulation") -> torch.device:
    """The torch device ``name`` (cpu, cuda, cuda:0, ...) that the param key ``key`` gives.

    A CUDA (or MPS) device on a machine without one falls back to the CPU with a warning (through
    ``decode_var.core.log``) naming the key, as DECODE's training falls back when
    ``torch.cuda.is_available()`` is false: a param file written for a GPU machine (DECODE's
    reference says ``cuda:0``) still runs, on the CPU, with the same CPU batches as ``cpu``.

    Raises:
        ParamError: a name torch does not know, or a CUDA index past the GPUs of this machine.
    """
    try:
        dev = torch.device(str(name).strip())
    except (RuntimeError, ValueError) as err:
        raise ParamError(f"{key} must be a device name (cpu, cuda, cuda:0, ...), got {name!r} ({err}).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            warn(f"{key} is {name!r} but CUDA is not available here ({why}): the data is simulated on the CPU. "
                 f"Set {key}: cpu to silence this, or run on a machine with a GPU.")
            return torch.device("cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParamError(f"{key} is {name!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of them or cpu.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        warn(f"{key} is {name!r} but MPS is not available here: the data is simulated on the CPU. "
             f"Set {key}: cpu to silence this.")
        return torch.device("cpu")
    return dev
