"""Localizing a frame stack with a trained model: batches streamed from the file, checked, fitted.

Used by ``decode-var-fit`` (:mod:`decode_var.fit`) and ``decode-var-eval --frames``. Blocks of frames are
read once (with the window's neighbours), checked (pixel type, NaN / Inf, negative ADU, constant
frames), moved to the device (pinned memory, non-blocking copies) while the next block is read in a
thread, and run through a :class:`~decode_var.inference.predictor.Predictor`. Emitter x, y are in px of
the input frame, x = first image axis (the row), as DECODE writes them; frame_ix counts from 0.

:func:`fit` works in blocks of frames (whole batches) and saves each finished block to ``<out>.partial/``
(:mod:`decode_var.inference.blocks`), so that a stopped fit resumes from its last finished block and
ends with the file an uninterrupted fit writes; the output itself is written once, at the end.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from decode_var.config.param import load_param
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.core.log import warn
from decode_var.data.emitter_io import save_emitters
from decode_var.data.tiff import open_stack, read_blocks, window_indices
from decode_var.inference.blocks import PartialFit, block_bounds, block_length, run_record
from decode_var.inference.export import filter_max_sigma
from decode_var.inference.predictor import (Predictor, default_max_memory, parse_memory,
                                            resolve_model_path)

#: numpy dtype kinds a frame stack may have: unsigned / signed integers and floats.
FRAME_KINDS = {"u": "unsigned integer", "i": "signed integer", "f": "float"}


def check_stack_dtype(dtype, path) -> None:
    """Camera frames are integers or floats; bool, complex or other pixel types are refused (reading them
    as float32 would silently turn a mask into 0/1 or drop the imaginary part)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in FRAME_KINDS:
        raise InputDataError(f"Frame file {path} has pixels of type {dtype} ({_kind_name(dtype)}); camera frames "
                             "must be integers (raw ADU, e.g. uint16) or floats. Export the stack as a grayscale "
                             "uint16 / float32 TIFF.")


def _kind_name(dtype) -> str:
    return {"b": "boolean", "c": "complex", "O": "object", "V": "structured", "U": "text", "S": "bytes",
            "M": "date", "m": "time delta"}.get(dtype.kind, dtype.kind)


#: A frame is saturated when at least this share of its pixels is at the maximum of the stack's integer
#: pixel type (65535 for uint16). A bright bead saturates a few pixels; a flash or a burst most of them.
SATURATED_SHARE = 0.25
#: A frame whose median, in photons after the camera conversion, is below this is below the camera
#: baseline: the background of a real frame is >= 0 photons; the 1-photon margin keeps frames whose
#: background is near 0 (offset-corrected, read noise) in.
BELOW_BASELINE_PHOTONS = -1.0
#: Above this share of a stack's pixels at negative photons the data does not fit the camera keys: a warning.
BELOW_BASELINE_SHARE = 0.5
#: Kinds of impossible frames, in the order a frame is named by (a frame all at 65535 is "saturated").
EXCLUDED_KINDS = ("saturated", "constant", "below_baseline")
_LABELS = {"saturated": "saturated", "constant": "constant images", "below_baseline": "below the camera baseline"}


def saturation_level(dtype) -> Optional[float]:
    """The saturated pixel value of an integer pixel type (its maximum), None for floats (no known maximum)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a torch dtype
        return None
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else None


def frame_kinds(raw_THW: torch.Tensor, photons_THW: torch.Tensor, saturation: Optional[float]) -> torch.Tensor:
    """(T,) int8 per frame: -1 for a frame to fit, else the index in :data:`EXCLUDED_KINDS` of why it is
    impossible: saturated (:data:`SATURATED_SHARE` of the pixels >= ``saturation``, raw units), constant
    (all pixels equal), below the baseline (median < :data:`BELOW_BASELINE_PHOTONS`, photons).

    Args:
        raw_THW: (T, H, W) frames as read (ADU when ``Camera.convert2photons``), finite.
        photons_THW: (T, H, W) the same frames in photons.
        saturation: the pixel type's saturated value (:func:`saturation_level`), None for none.
    """
    flat = raw_THW.flatten(1)
    below = photons_THW.flatten(1).median(1).values < BELOW_BASELINE_PHOTONS
    constant = flat.amax(1) == flat.amin(1)
    saturated = torch.zeros_like(constant)
    if saturation is not None:
        saturated = (flat >= saturation).float().mean(1) >= SATURATED_SHARE
    kind_T = torch.full((flat.size(0),), -1, dtype=torch.int8)
    for k in reversed(range(len(EXCLUDED_KINDS))):  # the first kind that applies names the frame
        kind_T[(saturated, constant, below)[k]] = k
    return kind_T


class StackReport:
    """What a fit read, left out and dropped, summarised once at the end (not per batch): the frames
    (count, size), the frames excluded as impossible by kind (all their indices: few in real data), the
    share of pixels below the camera baseline, the localizations dropped outside the frame / z range.

    Args:
        n_frames, frame_hw: the stack's frame count and (H, W) px.
        saturation: saturated pixel value (:func:`saturation_level` of the pixel type) or None.
        camera: the frames' settings (:class:`~decode_var.data.simulation.FrameSettings`: ``convert2photons``,
            ``baseline``), for the messages.
        path: the stack's file, for the messages and the output's metadata.
    """

    def __init__(self, n_frames: int, frame_hw, saturation: Optional[float], camera, path=None):
        self.n_frames, self.frame_hw = int(n_frames), tuple(int(s) for s in frame_hw)
        self.saturation, self.camera, self.path = saturation, camera, path
        self.n_seen = self.n_pixels = self.n_negative_px = 0
        self.excluded = {k: [] for k in EXCLUDED_KINDS}
        self.dropped = {"outside_frame": 0, "outside_z": 0}
        self._medians = []  # (T,) raw median per frame, per block

    @classmethod
    def for_stack(cls, pred, stack) -> "StackReport":
        return cls(len(stack), stack.shape[1:], saturation_level(getattr(stack, "dtype", None)), pred.frames,
                   getattr(stack, "path", None))

    def add(self, kind_T: torch.Tensor, raw_THW: torch.Tensor, photons_THW: torch.Tensor, first: int) -> None:
        """Frames ``first .. first + T - 1`` of the stack: their kinds (:func:`frame_kinds`), (T, H, W) raw
        and photons."""
        self.n_seen += kind_T.numel()
        self.n_pixels += photons_THW.numel()
        self.n_negative_px += int((photons_THW < 0).sum())
        self._medians.append(raw_THW.flatten(1).median(1).values)
        for k, name in enumerate(EXCLUDED_KINDS):
            self.excluded[name] += (torch.nonzero(kind_T == k).flatten() + first).tolist()

    def drop(self, dropped: dict) -> None:
        for k, v in dropped.items():
            self.dropped[k] += int(v)

    def blank(self) -> "StackReport":
        """An empty report of the same stack: one block's share of a fit, added with :meth:`merge`."""
        return StackReport(self.n_frames, self.frame_hw, self.saturation, self.camera, self.path)

    def state(self) -> dict:
        """The counts as plain values and one (T,) tensor of raw frame medians: what a block of a fit saves
        (:mod:`decode_var.inference.blocks`) so that a resumed fit ends with the same record."""
        return {"n_seen": self.n_seen, "n_pixels": self.n_pixels, "n_negative_px": self.n_negative_px,
                "excluded": {k: list(v) for k, v in self.excluded.items()}, "dropped": dict(self.dropped),
                "medians": torch.cat(self._medians) if self._medians else torch.zeros(0)}

    def merge(self, state: dict) -> None:
        """Add the :meth:`state` of a block of frames after those already counted."""
        self.n_seen += int(state["n_seen"])
        self.n_pixels += int(state["n_pixels"])
        self.n_negative_px += int(state["n_negative_px"])
        for k in EXCLUDED_KINDS:
            self.excluded[k] += [int(i) for i in state["excluded"][k]]
        self.drop(state["dropped"])
        if len(state["medians"]):
            self._medians.append(state["medians"])

    @property
    def n_excluded(self) -> int:
        return sum(len(v) for v in self.excluded.values())

    def finish(self) -> None:
        """Warnings naming the excluded frames and data far from the camera keys; an error when no frame is left."""
        path = self.path or "the stack"
        far = self._far_from_camera()
        if self.n_seen and self.n_excluded == self.n_seen:
            kinds = ", ".join(f"{len(v)} {k.replace('_', ' the ')}" for k, v in self.excluded.items() if v)
            raise InputDataError(f"every frame of {path} is impossible ({kinds}): there is nothing to fit. Check "
                                 "the export (blank, saturated or wrong channel?) and the Camera keys. "
                                 f"{far or ''}".strip())
        for k, frames in self.excluded.items():
            if frames:
                warn(f"{len(frames)} of {self.n_seen} frames are {_LABELS[k]} (e.g. frames "
                     f"{_first_ten(frames)}){self._why(k)}; they hold no emitters: not fitted, and left out of "
                     "their neighbours' windows.")
        if far:
            warn(far)

    def _why(self, kind: str) -> str:
        if kind == "saturated":
            return f": at least {SATURATED_SHARE:.0%} of their pixels at {self.saturation:g}, the pixel type's maximum"
        if kind == "constant":
            return ""
        unit = "after Camera.convert2photons" if self.camera.convert2photons else "(frames in photons)"
        return f": their median is below {BELOW_BASELINE_PHOTONS:g} photon {unit}"

    def _far_from_camera(self) -> Optional[str]:
        """The warning for a stack whose pixels are mostly negative photons, with the numbers; None if not."""
        share = self.n_negative_px / max(self.n_pixels, 1)
        if share <= BELOW_BASELINE_SHARE:
            return None
        median = float(torch.cat(self._medians).median())
        if self.camera.convert2photons:
            return (f"{share:.0%} of the pixels of {self.path or 'the stack'} are below the camera baseline (negative "
                    f"photons after the conversion): the frames' median is {median:g} ADU, Camera.baseline is "
                    f"{self.camera.baseline:g} ADU. Set Camera.baseline to the camera's offset (the ADU of a dark "
                    "frame), or Camera.convert2photons: false if the frames are offset-corrected or in photons.")
        return (f"{share:.0%} of the pixels of {self.path or 'the stack'} are negative photons (median {median:g}); "
                "Camera.convert2photons is false, so the frames should be photons (>= 0). If they are raw camera "
                "counts (ADU), set Camera.convert2photons: true with the camera's baseline, e_per_adu and em_gain.")

    def meta(self, dtype=None) -> dict:
        """What the output file stores about the data (:func:`decode_var.data.emitter_io.save_emitters`)."""
        meta = {"frames_file": str(self.path) if self.path is not None else "", "n_frames": self.n_frames,
                "frame_shape": list(self.frame_hw), "n_frames_fitted": self.n_seen - self.n_excluded}
        if dtype is not None:
            meta["frame_dtype"] = str(np.dtype(dtype))
        meta.update({f"excluded_{k}": list(v) for k, v in self.excluded.items()})
        meta.update({f"dropped_{k}": v for k, v in self.dropped.items()})
        return meta

    def summary(self, n_emitters: int, out) -> str:
        """One line for decode-var-fit: frames read and fitted, excluded by kind, emitters written, dropped."""
        h, w = self.frame_hw
        line = f"fitted {self.n_seen - self.n_excluded} of {self.n_frames} frames ({h} x {w} px)"
        kinds = [f"{k.replace('_', ' the ')} {_first_ten(v)}" for k, v in self.excluded.items() if v]
        if kinds:
            line += f"; {self.n_excluded} excluded: {', '.join(kinds)}"
        line += f"; wrote {n_emitters} emitters to {out}"
        n_drop = sum(self.dropped.values())
        if n_drop:
            line += (f"; dropped {n_drop} localizations ({self.dropped['outside_frame']} outside the frame, "
                     f"{self.dropped['outside_z']} outside the trained z range)")
        return line


def fit(param_file, model, frames, out, batch_size="auto", device="cpu", mask_nonfinite=False, trusted=False,
        progress=True, max_memory=None, compile=False, resume=False, block_frames=None, sparse=False,
        max_sigma=None):
    """Fit ``frames`` (a TIFF stack) with ``model``; write the emitters to ``out``; returns them, with
    ``fit_report``: the run's :class:`StackReport` (``summary()`` is the line decode-var-fit prints).

    The frame size is taken from the stack (any size, square or not; the param is not edited).
    ``batch_size='auto'`` picks the windows per batch from the frame size and ``max_memory`` (bytes,
    or a string such as '2G'; default :func:`decode_var.inference.predictor.default_max_memory`).

    Input guards (before the model sees a frame): pixel type (integers or floats), NaN / Inf pixels
    (error, or ``mask_nonfinite``), negative raw counts when ``Camera.convert2photons`` (error);
    impossible frames (saturated, constant, below the camera baseline: :func:`frame_kinds`) are not
    fitted and left out of their neighbours' windows, named in a warning at the end; a stack without a
    possible frame is an error; a stack mostly below the baseline is a warning with the numbers.
    Localizations outside the frame or the trained z range are dropped and counted. Non-finite model
    outputs are an error naming the frames. The output's metadata records the frames read, fitted and
    excluded and the localizations dropped (:meth:`StackReport.meta`).

    Blocks of ``block_frames`` frames (default :data:`~decode_var.inference.blocks.BLOCK_FRAMES`, whole
    batches) are saved to ``<out>.partial/`` as they finish (:mod:`decode_var.inference.blocks`).
    ``resume=True`` reuses them when the stack, param, model and options match, fits only the other
    blocks and writes the file an uninterrupted fit writes (it starts afresh where there is no folder);
    without it, a folder of finished blocks is an error. ``out`` is written only at the end, atomically.
    ``sparse``: the finer scales only around the coarse cells that see an emitter (:mod:`decode_var.nn.sparse`).
    ``max_sigma``: nm; only localizations whose predicted lateral sigma is at most this are written
    (:func:`~decode_var.inference.export.filter_max_sigma`; a model that predicts no sigma is refused before
    the fit). The blocks of a resumable fit hold every localization.
    """
    out = Path(out)
    if out.suffix not in (".h5", ".hdf5", ".csv", ".pt"):
        raise InputDataError(f"--out {out} must end in .h5, .csv or .pt (DECODE's emitter formats).")
    block_length(1, block_frames)  # a bad value fails now, not after the model is loaded
    partial = PartialFit(out)
    partial.check_start(resume)
    param = load_param(param_file)
    with open_stack(frames) as stack:
        if len(stack) == 0:
            raise InputDataError(f"{frames} holds no frames.")
        check_stack_dtype(stack.dtype, frames)
        pred = Predictor(param, resolve_model_path(model), device, trusted, sparse=sparse)
        _check_max_sigma(pred, max_sigma)
        try:
            run = _open_blocks(partial, pred, param, stack, frames, model, batch_size, max_memory, block_frames,
                               resume, compile, mask_nonfinite)
            if compile:
                pred.compile(run["batch_size"])
            report = StackReport.for_stack(pred, stack)
            em = _fit_blocks(pred, stack, partial, mask_nonfinite, progress, report)
            _finish(report, partial)
            em = _written(em, pred.frames.px_size, max_sigma)
            # our writer for every backend: DECODE's formats, plus the record of the data in the decode meta
            save_emitters(out, em, source=report.meta(stack.dtype))
            partial.remove()  # only now: the output is in place
        finally:
            partial.release()
    em.fit_report = report
    return em


def _check_max_sigma(pred, max_sigma) -> None:
    if max_sigma is not None and not pred.task.sigma:
        raise InputDataError(f"--max-sigma {max_sigma:g} filters on the model's predicted sigma, but this model "
                             "predicts none: train with VAR.model.uncertainty: true (or DECODE's SigmaMUNet), or "
                             "leave out --max-sigma.")


def _written(em: EmitterSet, px_size, max_sigma) -> EmitterSet:
    """The localizations as written: with the camera's pixel size (nm), filtered by ``max_sigma`` (nm) where given."""
    if em.px_size is None:
        em.px_size = torch.tensor(px_size, dtype=torch.float32)
    return em if max_sigma is None else filter_max_sigma(em, float(max_sigma), px_size)


def _open_blocks(partial, pred, param, stack, frames, model, batch_size, max_memory, block_frames, resume, compile,
                 mask_nonfinite) -> dict:
    """The manifest of the fit's block store: the existing one, checked (``resume``), or a new one (``param``: the
    fit's, whose values the manifest records)."""
    record = run_record(stack, frames, param, resolve_model_path(model), pred.device, compile, mask_nonfinite,
                        pred.sparse_threshold is not None)
    if resume and partial.done():
        auto = batch_size is None or str(batch_size).lower() == "auto"  # then the blocks' batch size
        given = None if auto else resolve_batch_size(pred, stack.shape[1:], len(stack), batch_size, max_memory)
        return partial.resume(record, given, block_frames)
    batch_size = resolve_batch_size(pred, stack.shape[1:], len(stack), batch_size, max_memory)
    return partial.start(record, batch_size, block_length(batch_size, block_frames))


def _fit_blocks(pred, stack, partial, mask_nonfinite: bool, progress: bool, report: StackReport) -> EmitterSet:
    """All localizations of the stack: the blocks not yet in ``partial`` are fitted and saved there as each
    finishes, then every block is read back in order (``report`` gets each block's record). Nothing that
    grows with the stack is held while the network runs; the finished and the resumed blocks come from the
    same files, so a resumed fit ends as an uninterrupted one."""
    manifest, done = partial.manifest, partial.done()
    bounds = block_bounds(len(stack), manifest["block_frames"])
    n_done = sum(b1 - b0 for b0, b1 in bounds if (b0, b1) in done)
    bar = None
    if progress:
        bar = progress_bar(len(stack), n_done, f"fitting ({n_done} frames resumed)" if n_done else "fitting")
    try:
        for b0, b1 in (b for b in bounds if b not in done):
            part = report.blank()
            sets = list(localize_stack(pred, stack, manifest["batch_size"], mask_nonfinite,
                                       bar if bar is not None else False, report=part, span=(b0, b1)))
            partial.save_block(b0, b1, EmitterSet.cat(sets) if sets else None, part.state())
    finally:
        if bar is not None:
            bar.close()
    ems = []
    for b0, b1 in bounds:
        em, state = partial.load_block(b0, b1)
        report.merge(state)
        if em is not None:  # a block without a fitted frame (all impossible) has no EmitterSet
            ems.append(em)
    return EmitterSet.cat(ems)


def _finish(report: StackReport, partial) -> None:
    """The report's warnings; when no frame could be fitted, the error, and the blocks go (resuming cannot
    change that)."""
    try:
        report.finish()
    except InputDataError:
        partial.remove()
        raise


def resolve_batch_size(pred, hw, n_frames: int, batch_size="auto", max_memory=None) -> int:
    """Windows per batch: an int >= 1 as given, or 'auto' from ``max_memory`` (bytes or '2G')."""
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


def localize_stack(pred, stack, batch_size: int, mask_nonfinite: bool = False, progress=False,
                   prefetch: bool = True, timings: Optional[dict] = None, report: Optional[StackReport] = None,
                   span: Optional[tuple] = None):
    """Yield the EmitterSets of each batch of ``batch_size`` centre frames of ``stack`` (frame_ix in the stack).

    Each frame is read and converted once: a block of frames (the batch plus the window's halo) is read
    (the next block on a background thread while the model runs), checked, converted to photons and
    to network units as a (T, H, W) block, and only then expanded into (B, C, H, W) windows. At the
    stack ends the windows repeat the first / last frame, as DECODE's ``Infer``; impossible frames
    (:func:`frame_kinds`) are not fitted and end their neighbours' windows the same way. Localizations
    outside the frame or the trained z range are dropped (:meth:`Predictor.localize`).

    ``timings``: a dict that receives the seconds spent per stage (``wait_read``: waiting for the
    reading thread, ``convert``: guards and unit conversion, ``windows``, ``model``, ``post``).
    ``report``: the :class:`StackReport` to fill (default: a new one); its warnings come at the end.
    ``progress``: True for a progress bar of its own, or a bar (``tqdm``) that counts the frames fitted.
    ``span``: ``(start, stop)``, the centre frames to fit (default all; the windows still read their
    neighbours outside it); the report then counts those frames only and is not finished: the caller
    adds up the spans (:meth:`StackReport.merge`) and finishes it.
    """
    report = report if report is not None else StackReport.for_stack(pred, stack)
    start, stop = span if span is not None else (0, len(stack))
    blocks = read_blocks(stack, batch_size, pred.channels_in, start, stop)
    bar = progress if hasattr(progress, "update") else None
    if progress and bar is None:
        bar = progress_bar(stop - start)
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
            for em in _localize_block(pred, item, len(stack), mask_nonfinite, report, clock):
                yield em
                clock.lap(None)  # the consumer's time is not ours
            if bar is not None:
                bar.update(item[1] - item[0])
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None and bar is not progress:
            bar.close()
    if span is None:
        report.finish()


#: The progress bar of a fit: frames done of all, the time spent < the time left, frames per second.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} frames [{elapsed}<{remaining}, {rate_noinv_fmt}]"


def progress_bar(total: int, done: int = 0, desc: str = "fitting") -> tqdm:
    """A bar of ``total`` frames with ``done`` of them counted from the start (a resumed fit's blocks): the
    rate and the time left count only the frames fitted by this process."""
    return tqdm(total=total, initial=done, desc=desc, unit=" frames", bar_format=BAR_FORMAT)


def _localize_block(pred, item, n_total: int, mask_nonfinite: bool, report: StackReport, clock):
    """The EmitterSets of one block of :func:`read_blocks` ``(b0, b1, lo, block_THW)``: one per run of
    consecutive possible centre frames (impossible ones are not fitted)."""
    b0, b1, lo, block_THW = item
    block_THW = check_block_values(block_THW, lo, mask_nonfinite, pred.frames.convert2photons)
    photons_THW = pred.adu_to_photons(block_THW)
    kind_T = frame_kinds(block_THW, photons_THW, report.saturation)
    centre = slice(b0 - lo, b1 - lo)
    report.add(kind_T[centre], block_THW[centre], photons_THW[centre], b0)
    net_THW = pred.to_network(photons_THW)
    clock.lap("convert")
    ix = window_indices(torch.arange(b0, b1), n_total, pred.channels_in, kind_T >= 0, lo) - lo
    windows_NCHW = net_THW[ix]
    clock.lap("windows")
    ems = []
    for r0, r1 in _runs(kind_T[centre] < 0):
        maps = pred.maps(windows_NCHW[r0:r1], first_frame=b0 + r0)
        clock.lap("model")
        em, dropped = pred.localize(maps, first_frame=b0 + r0, frame_hw=tuple(block_THW.shape[1:]))
        report.drop(dropped)
        ems.append(em)
        clock.lap("post")
    return ems


def _runs(keep_B: torch.Tensor) -> list:
    """[(start, stop), ...] of the runs of True in a (B,) bool tensor."""
    runs, start = [], None
    for i, k in enumerate(keep_B.tolist() + [False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return runs


class _StageClock:
    """Adds the seconds since the previous lap to ``timings[stage]`` (no-op without a dict)."""

    def __init__(self, timings: Optional[dict]):
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


def _first_ten(ix) -> list:
    """The first ten distinct frame indices of ``ix`` (a tensor or a list), '...' after them if there are more."""
    ix = sorted(set(ix.tolist() if isinstance(ix, torch.Tensor) else ix))
    return ix[:10] + (["..."] if len(ix) > 10 else [])
