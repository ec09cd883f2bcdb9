"""Safe model and checkpoint files.

- ``model.pt`` is a plain ``state_dict`` (what DECODE's ``LoadSaveModel`` writes and reads), so
  DECODE can load a decode-var model and vice versa.
- ``ckpt.pt`` holds only tensors, numbers, strings and plain containers (model, optimizer, LR
  schedule, loss state, history, param as a dict).

Both are written atomically and read with ``torch.load(weights_only=True)``: loading never runs
code. A file that needs arbitrary unpickling (an old pickled DECODE model, say) is refused unless
the caller opts in with ``trusted=True`` (``--trust-pickle`` on the command line) for a file
from a source they trust.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Union

import torch

from .atomic import atomic_torch_save
from .errors import CheckpointError

FORMAT = "decode-var-ckpt-1"
PathLike = Union[str, Path]


def save_checkpoint(path: PathLike, state: dict) -> None:
    atomic_torch_save(state, path)


def save_model(path: PathLike, model: torch.nn.Module, param=None) -> None:
    """``model.pt``: the plain state dict (DECODE's LoadSaveModel format)."""
    atomic_torch_save(model.state_dict(), path)


def safe_load(path: PathLike, trusted: bool = False, what: str = "file"):
    """``torch.load`` without code execution; every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The {what} {path} does not exist. Check the path (training writes model.pt and "
                              "ckpt.pt into the experiment folder).")
    if path.is_dir():
        raise CheckpointError(f"The {what} {path} is a folder; give the .pt file inside it.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"The {what} {path} is empty (0 bytes): it was not written completely. "
                              "Use an earlier file or retrain.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            raise CheckpointError(
                f"Refused to load {path}: it needs arbitrary unpickling, which can run code "
                f"({str(err).splitlines()[0][:200]}). decode-var's own files never need it. If the file comes "
                "from a source you trust (e.g. an old DECODE model), pass --trust-pickle (trusted=True).") from None
        raise CheckpointError(f"The {what} {path} is corrupt or not a PyTorch file ({err}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, KeyError,
            IndexError, TypeError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CheckpointError(f"The {what} {path} is truncated or corrupt and cannot be read ({msg}). "
                              "Use an earlier copy (ckpt.pt is only replaced once a new one is complete) "
                              "or retrain.") from None


def load_checkpoint(path: PathLike, trusted: bool = False) -> dict:
    state = safe_load(path, trusted, "checkpoint")
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a decode-var checkpoint (ckpt.pt); it has no model/epoch entries. "
                              "Give the ckpt.pt of an experiment folder in InOut.checkpoint_init.")
    return state


def model_state(path: PathLike, trusted: bool = False) -> dict:
    """The model's state dict from a model.pt, a ckpt.pt or a DECODE model file."""
    obj = safe_load(path, trusted, "model file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold model weights (a state dict of tensors).")
    return obj


def load_model_weights(model: torch.nn.Module, path: PathLike, trusted: bool = False) -> torch.nn.Module:
    """Load weights into ``model``; a mismatch says which keys or shapes differ and what to check."""
    state = model_state(path, trusted)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
            f"shape mismatch {shapes[:2]}" if shapes else ""]))
        raise CheckpointError(f"The model in {path} does not fit the model the param file builds ({detail}). "
                              "Use the param_run.yaml of the experiment that wrote it: HyperParameter.architecture, "
                              "channels_in, VAR.scales and VAR.model must match.")
    model.load_state_dict(state)
    return model
