"""Device names from a param file -> torch devices, with DECODE's fallback to the CPU when CUDA is absent."""
from __future__ import annotations

import torch

from decode_var.core.errors import DeviceError, ParamError
from decode_var.core.log import warn

#: The device names the command lines accept, as their messages spell them.
DEVICE_NAMES = "cpu, cuda, cuda:N, mps"


def available_devices() -> list[str]:
    """The devices of this machine: cpu, then cuda:0 .. cuda:N-1, then mps."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return names + (["mps"] if torch.backends.mps.is_available() else [])


def parse_device(name, flag: str = "-i/--device") -> torch.device:
    """The torch device ``name`` spells; a name that is not cpu, cuda, cuda:N or mps is a :class:`DeviceError`."""
    try:
        dev = torch.device(str(name).strip())
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {str(name)!r} for {flag} (use {DEVICE_NAMES}).")
    return dev


def check_device(name, flag: str = "-i/--device") -> torch.device:
    """The torch device ``name`` (from a command line), checked before any model or frame is loaded.

    Raises:
        DeviceError: an unknown name, or a device this machine does not have; the message names the
            devices that are available.
    """
    dev = parse_device(name, flag)
    have = ", ".join(available_devices())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise DeviceError(f"device {str(name)!r} is not available: {why} (available: {have}).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(name)!r} is not available: this machine has "
                              f"{torch.cuda.device_count()} GPU(s) (available: {have}).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(name)!r} is not available: MPS needs an Apple GPU (available: {have}).")
    return dev


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
