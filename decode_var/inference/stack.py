"""Localizing a frame stack with a trained model: batches streamed from the file, checked, fitted.

Used by ``decode-var-fit`` (:mod:`decode_var.fit`) and ``decode-var-eval --frames``. Blocks of frames are
read once (with the window's neighbours), checked (pixel type, NaN / Inf, negative ADU, constant
frames), moved to the device (pinned memory, non-blocking copies) while the next block is read in a
thread, and run through a :class:`~decode_var.inference.predictor.Predictor`. Emitter x, y are in px of
the input frame, x = first image axis (the row), as DECODE writes them; frame_ix counts from 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from decode_var.core.errors import InputDataError
from decode_var.core.log import warn

#: numpy dtype kinds a frame stack may have: unsigned / signed integers and floats.
FRAME_KINDS = {"u": "unsigned integer", "i": "signed integer", "f": "float"}


def check_stack_dtype(dtype, path) -> None:
    """Camera frames are integers or floats; bool, complex or other pixel types are refused (reading them
    as float32 would silently turn a mask into 0/1 or drop the imaginary part)."""
    import numpy as np

    dtype = np.dtype(dtype)
    if dtype.kind not in FRAME_KINDS:
        raise InputDataError(f"Frame file {path} has pixels of type {dtype} ({_kind_name(dtype)}); camera frames "
                             "must be integers (raw ADU, e.g. uint16) or floats. Export the stack as a grayscale "
                             "uint16 / float32 TIFF.")


def _kind_name(dtype) -> str:
    return {"b": "boolean", "c": "complex", "O": "object", "V": "structured", "U": "text", "S": "bytes",
            "M": "date", "m": "time delta"}.get(dtype.kind, dtype.kind)


class _StackReport:
    """Constant frames and frames with a negative median, summarised once at the end (not per batch).
    Keeps counts and the first 10 indices only: stacks can have millions of frames."""

    def __init__(self):
        self.n = self.n_constant = self.n_negative = 0
        self.constant, self.negative = [], []

    def add(self, frames_THW: torch.Tensor, first: int) -> None:
        """Frames ``first .. first + T - 1`` of the stack, (T, H, W)."""
        centre = frames_THW.flatten(1)
        finite = torch.where(torch.isfinite(centre), centre, torch.zeros(()))
        const = torch.nonzero(finite.amax(1) == finite.amin(1)).flatten() + first
        neg = torch.nonzero(finite.median(1).values < 0).flatten() + first
        self.n += centre.size(0)
        self.n_constant += len(const)
        self.n_negative += len(neg)
        self.constant = (self.constant + const.tolist())[:10]
        self.negative = (self.negative + neg.tolist())[:10]

    def finish(self, path) -> None:
        if self.n and self.n_constant == self.n:
            raise InputDataError(f"every frame of {path} is constant (all pixels equal): there is nothing to fit. "
                                 "Check the export (blank, saturated or wrong channel?).")
        if self.n_constant:
            warn(f"{self.n_constant} of {self.n} frames are constant images (e.g. frames {self.constant}); "
                  "they hold no emitters.")
        if self.n_negative:
            warn(f"{self.n_negative} frames have a negative median (e.g. {self.negative}): frames in photons "
                  "should have a background >= 0. Check Camera.convert2photons and the camera baseline.")


def fit(param_file, model, frames, out, batch_size="auto", device="cpu", mask_nonfinite=False, trusted=False,
        progress=True, max_memory=None, compile=False):
    """Fit ``frames`` (a TIFF stack) with ``model``; write the emitters to ``out``; returns them.

    The frame size is taken from the stack (any size, square or not; the param is not edited).
    ``batch_size='auto'`` picks the windows per batch from the frame size and ``max_memory`` (bytes,
    or a string such as '2G'; default :func:`decode_var.inference.predictor.default_max_memory`).

    Input guards (before the model sees a frame): pixel type (integers or floats), NaN / Inf pixels
    (error, or ``mask_nonfinite``), negative raw counts when ``Camera.convert2photons`` (error);
    constant frames and negative medians are reported at the end, a stack that is constant
    throughout is an error. Non-finite model outputs are an error naming the frames.
    """
    from decode_var.core.emitters import EmitterSet
    from decode_var.inference.predictor import Predictor, resolve_model_path
    from decode_var.config.param import load_param
    from decode_var.data.tiff import TiffStack

    out = Path(out)
    if out.suffix not in (".h5", ".hdf5", ".csv", ".pt"):
        raise InputDataError(f"--out {out} must end in .h5, .csv or .pt (DECODE's emitter formats).")
    param = load_param(param_file)
    stack = TiffStack(frames)
    if len(stack) == 0:
        raise InputDataError(f"{frames} holds no frames.")
    check_stack_dtype(stack.dtype, frames)
    pred = Predictor(param, resolve_model_path(model), device, trusted)
    batch_size = resolve_batch_size(pred, stack.shape[1:], len(stack), batch_size, max_memory)
    if compile:
        pred.compile(batch_size)
    em = EmitterSet.cat(localize_stack(pred, stack, batch_size, mask_nonfinite, progress))
    if em.px_size is None:
        em.px_size = torch.tensor(param.Camera.px_size, dtype=torch.float32)
    pred.backend.save_emitters(out, em)
    return em


def resolve_batch_size(pred, hw, n_frames: int, batch_size="auto", max_memory=None) -> int:
    """Windows per batch: an int >= 1 as given, or 'auto' from ``max_memory`` (bytes or '2G')."""
    from decode_var.inference.predictor import default_max_memory, parse_memory

    if max_memory is None:
        budget = default_max_memory(pred.device)
    else:
        budget = max_memory if isinstance(max_memory, int) else parse_memory(max_memory)
    if batch_size is None or str(batch_size).lower() == "auto":
        return pred.auto_batch_size(hw, budget, n_frames)
    try:
        n = int(batch_size)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise InputDataError(f"--batch-size must be 'auto' or an integer >= 1, got {batch_size!r}.")
    return n


def localize_stack(pred, stack, batch_size: int, mask_nonfinite: bool = False, progress: bool = False,
                   prefetch: bool = True, timings: Optional[dict] = None):
    """Yield one EmitterSet per batch of ``batch_size`` centre frames of ``stack`` (frame_ix in the stack).

    Each frame is read and converted once: a block of frames (the batch plus the window's halo) is read
    (the next block on a background thread while the model runs), checked, converted to photons and
    to network units as a (T, H, W) block, and only then expanded into (B, C, H, W) windows. At the
    stack ends the windows repeat the first / last frame, as DECODE's ``Infer``.

    ``timings``: a dict that receives the seconds spent per stage (``wait_read``: waiting for the
    reading thread, ``convert``: guards and unit conversion, ``windows``, ``model``, ``post``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from decode_var.data.tiff import read_blocks, window_indices

    n_total = len(stack)
    hw = tuple(stack.shape[1:])
    adu = bool(pred.param.Camera.convert2photons)
    report = _StackReport()
    blocks = read_blocks(stack, batch_size, pred.channels_in)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_total, desc="fitting", unit="frame")
    pool = ThreadPoolExecutor(1) if prefetch else None
    try:
        clock = _StageClock(timings)
        nxt = pool.submit(next, blocks, None) if pool else None
        while True:
            item = nxt.result() if pool else next(blocks, None)
            clock.lap("wait_read")
            if item is None:
                break
            if pool:
                nxt = pool.submit(next, blocks, None)
            b0, b1, lo, block_THW = item
            block_THW = check_block_values(block_THW, lo, mask_nonfinite, adu)
            report.add(block_THW[b0 - lo:b1 - lo], b0)
            net_THW = pred.to_network(pred.adu_to_photons(block_THW))
            clock.lap("convert")
            ix = window_indices(torch.arange(b0, b1), n_total, pred.channels_in) - lo
            windows_NCHW = net_THW[ix]
            clock.lap("windows")
            maps = pred.maps(windows_NCHW, first_frame=b0)
            clock.lap("model")
            em = pred.emitters(maps, first_frame=b0, frame_hw=hw)
            clock.lap("post")
            yield em
            clock.lap(None)  # the consumer's time is not ours
            if bar is not None:
                bar.update(b1 - b0)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    report.finish(stack.path if hasattr(stack, "path") else "the stack")


class _StageClock:
    """Adds the seconds since the previous lap to ``timings[stage]`` (no-op without a dict)."""

    def __init__(self, timings: Optional[dict]):
        import time

        self.timings, self._now = timings, time.perf_counter
        self.t = self._now()

    def lap(self, stage: Optional[str]) -> None:
        if self.timings is None:
            return
        t = self._now()
        if stage is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + t - self.t
        self.t = t


def check_block_values(frames_THW: torch.Tensor, first: int, mask_nonfinite: bool, adu: bool = False) -> torch.Tensor:
    """Per block of consecutive frames ``first ..``, before the model: NaN/Inf pixels and negative raw counts.

    Args:
        frames_THW: (T, H, W) frames of the stack, ``first`` being the index of frame 0.
        mask_nonfinite: replace NaN/Inf pixels by the median of the frame's finite pixels (0 if none)
            instead of raising.
        adu: frames are raw camera counts (``Camera.convert2photons``): negative pixels are an error.

    Raises:
        InputDataError: naming the stack's frames concerned and the fix.
    """
    bad = ~torch.isfinite(frames_THW).flatten(1).all(1)
    if bad.any():
        ix = _first_ten(torch.nonzero(bad).flatten() + first)
        if not mask_nonfinite:
            raise InputDataError(f"frames {ix} of the stack contain NaN or Inf pixels. Repair them, or pass "
                                 "--mask-nonfinite to replace them by each frame's median.")
        frames_THW = frames_THW.clone()
        for t in torch.nonzero(bad).flatten().tolist():
            f = frames_THW[t]
            ok = torch.isfinite(f)
            f[~ok] = f[ok].median() if ok.any() else 0.0
    if adu:
        neg = (frames_THW < 0).flatten(1).any(1)
        if neg.any():
            raise InputDataError(
                f"frames {_first_ten(torch.nonzero(neg).flatten() + first)} have negative pixels, but "
                "Camera.convert2photons is true, so the frames should be raw camera counts (ADU, never negative). "
                "If the frames are in photons or offset-corrected already, set Camera.convert2photons: false in "
                "the param file.")
    return frames_THW


def _first_ten(ix: torch.Tensor) -> list:
    ix = sorted(set(ix.tolist()))
    return ix[:10] + (["..."] if len(ix) > 10 else [])
