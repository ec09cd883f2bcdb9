"""Safe model and checkpoint files.

- ``model.pt`` is a plain ``state_dict`` (what DECODE's ``LoadSaveModel`` writes and reads), so
  DECODE can load a decode-var model and vice versa.
- ``ckpt.pt`` holds only tensors, numbers, strings and plain containers (model, optimizer, LR
  schedule, loss state, history, param as a dict).

Both are written atomically and read with ``torch.load(weights_only=True)``: loading never runs
code. A file that needs arbitrary unpickling (an old pickled DECODE model, say) is refused unless
the caller opts in with ``trusted=True`` (``--trust-pickle`` on the command line) for a file
from a source they trust. Every failure (missing, empty, truncated, corrupt, refused, incomplete) is a
:class:`~decode_var.core.errors.CheckpointError` naming the file, never a traceback from inside torch.

``ckpt.pt`` is written before ``model.pt`` and ``history.json`` at the end of an epoch; a process
killed in between is repaired when the run is resumed (:func:`load_checkpoint`).
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Union

import torch

from decode_var.core.atomic import atomic_torch_save, atomic_write_text, remove_stale_temporaries
from decode_var.core.errors import CheckpointError

FORMAT = "decode-var-ckpt-1"
#: How much of a file that torch could not load is parsed to tell a pickle from random bytes.
_PICKLE_PROBE_BYTES = 1 << 20
PathLike = Union[str, Path]


def save_checkpoint(path: PathLike, state: dict) -> None:
    atomic_torch_save(state, path)


def save_model(path: PathLike, model: torch.nn.Module, param=None) -> None:
    """``model.pt``: the plain state dict (DECODE's LoadSaveModel format)."""
    atomic_torch_save(model.state_dict(), path)


def safe_load(path: PathLike, trusted: bool = False, what: str = "file"):
    """``torch.load`` without code execution; every failure is a :class:`CheckpointError` naming the file.

    ``trusted=True`` (``--trust-pickle``) allows arbitrary unpickling: only for a file from a source you
    trust, e.g. a DECODE model saved as a whole pickled module. Loading such a file can run any code.
    """
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
        with warnings.catch_warnings():
            # torch warns about pickle protocols it does not expect; the load below decides
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        text = str(err)
        if not _torch_or_pickle(path):  # random bytes, a TIFF, a text file: no trust question to ask
            raise CheckpointError(f"The {what} {path} is corrupt or not a model file: it is neither a PyTorch "
                                  "file nor a pickle. Check the path, or use an earlier copy.") from None
        if not trusted and ("Weights only load failed" in text or "weights_only" in text):
            raise CheckpointError(
                f"Refused to load {path}: it needs arbitrary unpickling, which can run code "
                f"({_unpickler_reason(text)}); nothing in it was executed. decode-var's own files never need "
                "this. Only if the file comes from a source you trust (e.g. an old DECODE model saved as a whole "
                "module), pass --trust-pickle (trusted=True).") from None
        raise CheckpointError(f"The {what} {path} is corrupt or not a PyTorch file ({_first_line(err)}).") from None
    except ImportError as err:  # trusted unpickling of a file that names modules not installed here
        raise CheckpointError(f"The {what} {path} needs the Python module '{getattr(err, 'name', None) or err}' "
                              "to be unpickled (an old DECODE model needs DECODE installed). Install it, or "
                              "load a plain state dict (model.pt) instead.") from None
    except PermissionError as err:
        raise CheckpointError(f"The {what} {path} cannot be read ({err.strerror}). Check its permissions.") from None
    except MemoryError:
        raise CheckpointError(f"The {what} {path} is corrupt: it declares more data than fits in memory.") from None
    except Exception as err:  # zip, pickle and storage errors of a truncated / corrupt file have many types
        raise CheckpointError(f"The {what} {path} is truncated or corrupt and cannot be read ({_first_line(err)}). "
                              "Use an earlier copy (ckpt.pt is only replaced once a new one is complete) "
                              "or retrain.") from None


def _torch_or_pickle(path: Path) -> bool:
    """Whether ``path`` is a zip archive (torch's format) or starts with a well-formed pickle.

    torch's legacy format and plain pickles start with a pickle; its opcodes are only parsed, nothing is
    loaded or run. A file of random bytes fails within a few bytes. Only the first MiB is parsed: a pickle
    still going at its end counts as one.
    """
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(_PICKLE_PROBE_BYTES))
    try:
        for opcode, _, _ in pickletools.genops(head):
            if opcode.name == "STOP":
                return True
    except Exception:  # an unknown opcode, or an argument cut by the end of what was read
        return head.tell() >= _PICKLE_PROBE_BYTES
    return False



def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:200] if text else "") or type(err).__name__


def _unpickler_reason(text: str) -> str:
    """The useful part of torch's weights-only refusal, e.g. 'Unsupported global: GLOBAL posix.system'."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", text, flags=re.S)
    reason = " ".join((m.group(1) if m else text.splitlines()[0]).split())
    return re.sub(r"\x1b\[[0-9;]*m", "", reason)[:200]


#: Entries every decode-var checkpoint has (``Trainer.state_dict``), with their types.
_CKPT_ENTRIES = {"model": dict, "optimizer": dict, "lr_scheduler": dict, "epoch": int}


def load_checkpoint(path: PathLike, trusted: bool = False) -> dict:
    """Read a ``ckpt.pt`` to resume from it.

    Resuming also tidies the experiment folder after a crash: leftovers of interrupted atomic writes
    (untouched for 10 minutes) are deleted, and ``model.pt`` and ``history.json`` are brought up to date
    when the process was killed after writing ``ckpt.pt`` at the end of an epoch but before them (the
    checkpoint is written first and is the reference).
    """
    path = Path(path)
    state = safe_load(path, trusted, "checkpoint")
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a decode-var checkpoint (ckpt.pt); it has no model/epoch entries. "
                              "Give the ckpt.pt of an experiment folder in InOut.checkpoint_init.")
    bad = [f"{k} ({type(state.get(k)).__name__})" for k, t in _CKPT_ENTRIES.items()
           if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if bad:
        raise CheckpointError(f"The checkpoint {path} is incomplete or damaged: entries {', '.join(bad)} are missing "
                              f"or of the wrong type (needs {', '.join(_CKPT_ENTRIES)}). Use an earlier ckpt.pt "
                              "or start a new run (InOut.model_init can take its weights).")
    _tidy_experiment(path, state)
    return state


def _tidy_experiment(ckpt_path: Path, state: dict) -> None:
    for name in (ckpt_path.name, "model.pt", "history.json"):
        remove_stale_temporaries(ckpt_path.parent / name)
    _sync_history(ckpt_path.parent / "history.json", state.get("history"))
    if state.get("partial_epoch"):
        return  # model.pt holds the last complete epoch, which a mid-epoch checkpoint does not
    model_path = ckpt_path.parent / "model.pt"
    weights = state["model"]
    try:
        current = torch.load(model_path, map_location="cpu", weights_only=True) if model_path.exists() else None
    except Exception:  # damaged model.pt: replaced below
        current = None
    try:
        same = isinstance(current, dict) and current.keys() == weights.keys() and all(
            torch.equal(current[k], v) if isinstance(v, torch.Tensor) else current[k] == v
            for k, v in weights.items())
    except (TypeError, RuntimeError):  # an entry of another type or shape: not the same
        same = False
    if not same:
        try:
            atomic_torch_save(weights, model_path)
        except OSError:  # read-only folder: training will fail later with its own message
            pass


def _sync_history(path: Path, history) -> None:
    """history.json as the checkpoint has it (a kill after ckpt.pt, before history.json, leaves it behind)."""
    if not isinstance(history, list) or not path.exists():
        return
    text = json.dumps(history, indent=1, default=float)  # the engine's format
    try:
        # compared as canonical text: NaN metrics (nothing matched yet) never compare equal as floats
        same = json.dumps(json.loads(path.read_text()), sort_keys=True) == \
            json.dumps(json.loads(text), sort_keys=True)
    except (OSError, ValueError):
        same = False
    if not same:
        try:
            atomic_write_text(path, text)
        except OSError:
            pass


def model_state(path: PathLike, trusted: bool = False) -> dict:
    """The model's state dict from a model.pt, a ckpt.pt or a DECODE model file."""
    obj = safe_load(path, trusted, "model file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    # tensors, plus modules' plain "_extra_state" entries (get_extra_state)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) or str(k).endswith("_extra_state")
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold model weights (a state dict of tensors).")
    return obj


def load_model_weights(model: torch.nn.Module, path: PathLike, trusted: bool = False) -> torch.nn.Module:
    """Load weights into ``model``; a mismatch says which keys or shapes differ and what to check."""
    state = model_state(path, trusted)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and isinstance(own[k], torch.Tensor)
              and state[k].shape != own[k].shape]
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
