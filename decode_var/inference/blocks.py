"""The finished blocks of a fit in progress, in ``<out>.partial/``: a stopped fit goes on where it stopped.

A fit (:func:`decode_var.inference.stack.fit`) cuts the stack into blocks of ``block_frames`` consecutive
frames, a whole number of batches, so that a block's batches and 3-frame windows are those of an
uninterrupted fit (the windows at a block's ends read the neighbouring frames from the stack). Each
finished block goes to its own file, ``frames_<first>-<stop>.pt``: its localizations and its share of the
fit's record (frames read, excluded, localizations dropped: :meth:`StackReport.state`), written
atomically (temporary file, fsync, rename), so a block file is complete or absent.

``manifest.json`` records what the blocks were fitted from: the stack (frame count, frame size, pixel
type, bytes and latest modification time of its files, a SHA-256 of its first, middle and last frames),
the param (SHA-256 of its values) and the model file (SHA-256), the device type, ``--compile``,
``--mask-nonfinite``, the batch size, the frames per block and the decode-var version. ``--resume``
reuses the blocks when all of that matches (else one error naming each difference) and fits the other
blocks; the output is written from all blocks with the atomic writer, and the folder is removed only
after the output is in place. The CPU threads are recorded too: another thread count changes the
network's sums in the last digits (3e-5 px seen between 1 and 2 threads), so a resume with another
count warns instead of refusing. A folder left by a stopped fit is never discarded silently: without
``--resume`` it is an error. A fit locks the folder (``flock``), so two fits of one output cannot mix
their blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two fits of one output at once are then not caught
    fcntl = None

from decode_var.core.atomic import atomic_torch_save, atomic_write_text
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.core.log import warn
from decode_var.core.version import __version__

__all__ = ["BLOCK_FRAMES", "PartialFit", "PartialFitError", "partial_folder", "block_length", "block_bounds",
           "run_record", "stack_fingerprint"]

#: Frames per block unless told (rounded up to whole batches): a stopped fit loses at most one block of work,
#: and a 10,000-frame stack makes 100 files.
BLOCK_FRAMES = 100
MANIFEST = "manifest.json"
_LOCK = "lock"
_BLOCK = re.compile(r"frames_(\d+)-(\d+)\.pt")
_FORMAT = 1


class PartialFitError(InputDataError):
    """The blocks of a stopped fit cannot be resumed as asked, or would be discarded: the message says why
    and what to do (resume with the same inputs, or delete the folder)."""


def partial_folder(out) -> Path:
    """``<out>.partial``, next to the output file ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def block_length(batch_size: int, block_frames: Optional[int] = None) -> int:
    """Frames per block: ``block_frames`` (default :data:`BLOCK_FRAMES`) rounded up to whole batches."""
    want = BLOCK_FRAMES if block_frames is None else block_frames
    if not isinstance(want, int) or isinstance(want, bool) or want < 1:
        raise InputDataError(f"--block-frames must be an integer >= 1, got {block_frames!r}.")
    return -(-want // batch_size) * batch_size


def block_bounds(n_frames: int, block_frames: int) -> list:
    """[(first, stop), ...]: the blocks of a stack of ``n_frames`` frames, in order."""
    return [(b0, min(n_frames, b0 + block_frames)) for b0 in range(0, n_frames, block_frames)]


# ------------------------------------------------------------------------------------------ identity
def stack_fingerprint(stack, frames) -> dict:
    """What identifies a stack, cheaply: frame count and size, pixel type, the bytes and the latest
    modification time of its file(s), and a SHA-256 of its first, middle and last frames (3 frames read)."""
    files = list(getattr(stack, "files", None) or [Path(frames)])  # a FolderStack's files, or the TIFF
    stats = [os.stat(f) for f in files]
    n = len(stack)
    digest = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1}):
        digest.update(stack.read(i, i + 1).tobytes())
    return {"path": str(Path(frames).resolve()), "n_frames": n, "frame_shape": [int(s) for s in stack.shape[1:]],
            "dtype": str(stack.dtype), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats), "sample_sha256": digest.hexdigest()}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_record(stack, frames, param, model_path, device, compile: bool, mask_nonfinite: bool,
               sparse: bool = False) -> dict:
    """What the blocks of a fit depend on (the manifest, less the batch size and block length)."""
    values = json.dumps(param.to_dict(), sort_keys=True, default=str)
    return {"decode_var": __version__, "frames": stack_fingerprint(stack, frames),
            "param_sha256": hashlib.sha256(values.encode()).hexdigest(), "model_sha256": file_sha256(model_path),
            "device": torch.device(device).type, "compile": bool(compile), "mask_nonfinite": bool(mask_nonfinite),
            "threads": torch.get_num_threads(), "sparse": bool(sparse)}


def _when(ns) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds") if ns else str(ns)


#: (manifest key of the stack, the words for a difference, how values are shown)
_FRAME_KEYS = (("n_frames", "{} frames, now {}", str), ("frame_shape", "frames of {} px, now {}", str),
               ("dtype", "pixel type {}, now {}", str), ("bytes", "{} bytes, now {}", str),
               ("mtime_ns", "modified {}, now {}", _when),
               ("sample_sha256", "other pixels in the first, middle or last frame", str))


def _differences(old: dict, new: dict, batch_size: Optional[int], block_frames: Optional[int]) -> list:
    """What differs between a manifest and this fit (``batch_size`` / ``block_frames`` None: as before)."""
    f_old, f_new = old.get("frames", {}), new["frames"]
    found = [fmt.format(show(f_old.get(k)), show(f_new[k])) for k, fmt, show in _FRAME_KEYS
             if f_old.get(k) != f_new[k]]
    if found:
        found = [f"--frames {f_new['path']} is not the stack they come from ({f_old.get('path')}): "
                 + ", ".join(found)]
    if old.get("param_sha256") != new["param_sha256"]:
        found.append("-p holds other param values")
    if old.get("model_sha256") != new["model_sha256"]:
        found.append("--model is another model file")
    if old.get("device") != new["device"]:
        found.append(f"they were fitted on {old.get('device')}, this fit runs on {new['device']} "
                     f"(pass -i {old.get('device')})")
    if old.get("compile") != new["compile"]:
        found.append(f"they were fitted {'with' if old.get('compile') else 'without'} --compile")
    if bool(old.get("sparse")) != new["sparse"]:
        found.append(f"they were fitted {'with' if old.get('sparse') else 'without'} --sparse")
    if old.get("mask_nonfinite") and not new["mask_nonfinite"]:
        found.append("they were fitted with --mask-nonfinite (pass it again)")
    if batch_size is not None and batch_size != old.get("batch_size"):
        found.append(f"they were fitted with --batch-size {old.get('batch_size')}, not {batch_size} "
                     f"(pass --batch-size {old.get('batch_size')} or auto)")
    if block_frames is not None and block_length(old.get("batch_size", 1), block_frames) != old.get("block_frames"):
        found.append(f"their blocks hold {old.get('block_frames')} frames (pass --block-frames "
                     f"{old.get('block_frames')} or leave it out)")
    if old.get("decode_var") != new["decode_var"]:
        found.append(f"they were written by decode-var {old.get('decode_var')}, this is {new['decode_var']}")
    return found


# ------------------------------------------------------------------------------------------ the store
class PartialFit:
    """The block store of the fit of ``out``: ``<out>.partial/`` (see the module's docstring).

    Use: :meth:`check_start` before anything is loaded; :meth:`start` (a new fit) or :meth:`resume` (the
    manifest checked); :meth:`done`, :meth:`load_block`, :meth:`save_block` while fitting; :meth:`remove`
    once the output is written; :meth:`release` always at the end (unlocks; a store without a block goes).
    """

    def __init__(self, out):
        self.out = Path(out)
        self.folder = partial_folder(out)
        self.manifest: Optional[dict] = None
        self._lock_fd: Optional[int] = None

    def exists(self) -> bool:
        return self.folder.exists() or self.folder.is_symlink()

    def done(self) -> dict:
        """{(first, stop): path} of the finished blocks."""
        found = {}
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                m = _BLOCK.fullmatch(p.name)
                if m:
                    found[(int(m[1]), int(m[2]))] = p
        return found

    def describe(self) -> Optional[str]:
        """'3 finished blocks (300 of 1000 frames) are kept in em.h5.partial', None without a block."""
        done = self.done()
        if not done:
            return None
        n_done = sum(b1 - b0 for b0, b1 in done)
        try:
            total = f" of {json.loads((self.folder / MANIFEST).read_text())['frames']['n_frames']}"
        except (OSError, ValueError, KeyError, TypeError):
            total = ""
        s = "s" if len(done) > 1 else ""
        return f"{len(done)} finished block{s} ({n_done}{total} frames) {'are' if s else 'is'} kept in {self.folder}"

    def check_start(self, resume: bool) -> None:
        """Before anything is loaded: a store of finished blocks is resumed (``--resume``) or deleted by the
        user, never discarded here."""
        if not self.exists():
            return
        if not self.folder.is_dir():
            raise PartialFitError(f"cannot keep the blocks of the fit of {self.out} in {self.folder}: it is a file, "
                                  "not a folder. Move it away, or choose another --out.")
        kept = self.describe()
        if kept and not resume:
            raise PartialFitError(f"a stopped fit of {self.out} left its blocks: {kept}. Pass --resume to continue "
                                  f"it, or delete {self.folder} to start over.")

    def start(self, record: dict, batch_size: int, block_frames: int) -> dict:
        """A new store for the fit described by ``record`` (:func:`run_record`); returns its manifest."""
        self.folder.mkdir(parents=True, exist_ok=True)  # exists only empty (check_start): a killed start
        self._lock()
        if self.done():  # written meanwhile by another fit, now ended
            raise PartialFitError(f"{self.folder} holds finished blocks: pass --resume, or delete it to start over.")
        self._clear_temporaries()
        return self._write_manifest({"format": _FORMAT, **record, "batch_size": int(batch_size),
                                     "block_frames": int(block_frames)})

    def resume(self, record: dict, batch_size: Optional[int] = None, block_frames: Optional[int] = None) -> dict:
        """The store's manifest, checked against ``record`` (and an explicit batch size or block length), and
        every finished block read once; raises :class:`PartialFitError` naming every difference, or the
        damaged block."""
        self._lock()
        self._clear_temporaries()
        try:
            old = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise PartialFitError(f"cannot resume the fit of {self.out}: {self.folder / MANIFEST} cannot be read "
                                  f"({type(err).__name__}: {err}). Delete {self.folder} to start over.") from err
        diffs = _differences(old, record, batch_size, block_frames)
        if diffs:
            raise PartialFitError(f"cannot resume the fit of {self.out} from {self.folder}: {'; '.join(diffs)}. Its "
                                  "blocks would not match the frames fitted now: resume with the same inputs and "
                                  f"options, or delete {self.folder} and run without --resume to start over.")
        for first, stop in sorted(self.done()):  # a damaged block is named now, not after hours of fitting
            self.load_block(first, stop)
        if old.get("threads") != record["threads"] and record["device"] == "cpu":
            warn(f"the finished blocks in {self.folder} were fitted with {old.get('threads')} CPU threads, this fit "
                 f"runs {record['threads']}: the localizations of the other blocks may differ from an uninterrupted "
                 "fit's in the last digits (about 1e-5 px). For an identical file, resume with the same number "
                 f"of threads (OMP_NUM_THREADS={old.get('threads')}).")
        if record["mask_nonfinite"] and not old["mask_nonfinite"]:  # blocks done without NaN are the same
            return self._write_manifest({**old, "mask_nonfinite": True})
        self.manifest = old
        return old

    def save_block(self, first: int, stop: int, em: Optional[EmitterSet], report_state: dict) -> Path:
        """Write a finished block atomically: its localizations (None: no frame of it fitted) and record."""
        path = self._block_path(first, stop)
        data = None if em is None else em.to_dict()
        return atomic_torch_save({"frames": [first, stop], "emitters": data, "report": report_state}, path)

    def load_block(self, first: int, stop: int) -> tuple:
        """(EmitterSet or None, report state) of a finished block."""
        path = self._block_path(first, stop)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            em = None if obj["emitters"] is None else EmitterSet(**obj["emitters"])
            return em, obj["report"]
        except Exception as err:  # torch raises many types for a damaged file
            raise PartialFitError(f"the finished block {path} is damaged (reading it raised {type(err).__name__}). "
                                  "Delete that file and resume again: its frames are then fitted anew.") from err

    def remove(self) -> None:
        """Delete the store (the output is in place)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        """Unlock; a store without a finished block is removed (nothing in it to resume)."""
        if self._lock_fd is not None:
            if not self.done():
                shutil.rmtree(self.folder, ignore_errors=True)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _block_path(self, first: int, stop: int) -> Path:
        return self.folder / f"frames_{first:06d}-{stop:06d}.pt"

    def _write_manifest(self, manifest: dict) -> dict:
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.manifest = manifest
        return manifest

    def _lock(self) -> None:
        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PartialFitError(f"another fit is writing {self.out} ({self.folder} is in use): wait for it "
                                      "to end, or choose another --out.") from None
            except OSError:  # a file system without locks (some network mounts): go on unlocked
                pass
        self._lock_fd = fd

    def _clear_temporaries(self) -> None:
        """Temporary files of block writes a killed fit left (we hold the lock: nobody else writes here)."""
        for p in self.folder.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
