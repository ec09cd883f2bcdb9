"""``decode-var-fit``: localize emitters in a TIFF stack with a trained model.

    decode-var-fit -p param_run.yaml --model model.pt --frames stack.tif --out emitters.h5|csv|pt

Reads the stack lazily in batches (stacks larger than memory work), pads the frame window at the
stack ends as DECODE's ``Infer`` does (repeating the first / last frame), converts ADU to photons
when ``Camera.convert2photons`` is set, and writes DECODE's emitter file formats. The output is
written under a temporary name and renamed when complete: a failed run leaves no partial file.

Input guards (each a clear error with exit status 2, before the model sees the frame):

- pixel type: integers or floats; bool, complex and other types are refused;
- NaN / Inf pixels: refused with the frame indices, or with ``--mask-nonfinite`` replaced by the median
  of the frame's finite pixels;
- negative pixels while ``Camera.convert2photons`` is true (raw camera counts are never negative):
  refused; set ``convert2photons: false`` for frames already in photons;
- a frame size the model's ``VAR.scales`` cannot divide: refused;
- constant frames and frames with a negative median: reported at the end; a stack that is constant
  throughout is refused (nothing to fit);
- non-finite model outputs: refused, naming the frames (``Predictor.output``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DecodeVarError, InputDataError


def parse_args(argv=None):
    from .inference import add_model_arguments

    p = argparse.ArgumentParser(prog="decode-var-fit", description="Fit emitters in a TIFF stack.")
    add_model_arguments(p, frames_help=None)
    p.add_argument("--out", required=True, help="emitter file: .h5, .csv or .pt (DECODE's formats)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mask-nonfinite", action="store_true",
                   help="replace NaN/Inf pixels by the median of the frame's finite pixels instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


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


def check_stack_values(frames: torch.Tensor, first: int, mask_nonfinite: bool, adu: bool = False,
                       n_frames: Optional[int] = None) -> torch.Tensor:
    """Per batch, before the model: NaN/Inf pixels and negative raw counts.

    Args:
        frames: (N, C, H, W) windows centred on frames ``first .. first + N - 1`` (as ``window_batches``).
        mask_nonfinite: replace NaN/Inf pixels by the median of the frame's finite pixels (0 if none)
            instead of raising.
        adu: frames are raw camera counts (``Camera.convert2photons``): negative pixels are an error.
        n_frames: frames in the stack (to name the frames of the padded windows at the end correctly).

    Raises:
        InputDataError: naming the stack's frames concerned and the fix.
    """
    bad = ~torch.isfinite(frames).flatten(2).all(2)  # (N, C)
    if bad.any():
        if not mask_nonfinite:
            raise InputDataError(f"frames {_window_frames(bad, first, n_frames)} of the stack contain NaN or Inf "
                                 "pixels. Repair them, or pass --mask-nonfinite to replace them by each frame's "
                                 "median.")
        frames = frames.clone()
        for i, c in torch.nonzero(bad).tolist():
            f = frames[i, c]
            ok = torch.isfinite(f)
            f[~ok] = f[ok].median() if ok.any() else 0.0
    if adu:
        neg = (frames < 0).flatten(2).any(2)
        if neg.any():
            raise InputDataError(
                f"frames {_window_frames(neg, first, n_frames)} have negative pixels, but Camera.convert2photons is "
                "true, so the frames should be raw camera counts (ADU, never negative). If the frames are in photons "
                "or offset-corrected already, set Camera.convert2photons: false in the param file.")
    return frames


def _window_frames(mask_NC: torch.Tensor, first: int, n_frames: Optional[int]) -> list:
    """Stack indices of the flagged (window, channel) entries; channel c of window b is frame
    first + b + c - C // 2, clamped to the stack as window_batches does."""
    b, c = torch.nonzero(mask_NC, as_tuple=True)
    ix = (b + c - mask_NC.size(1) // 2 + first).clamp(min=0)
    if n_frames is not None:
        ix = ix.clamp(max=n_frames - 1)
    ix = sorted(set(ix.tolist()))
    return ix[:10] + (["..."] if len(ix) > 10 else [])


class _StackReport:
    """Constant frames and frames with a negative median, summarised once at the end (not per batch).
    Keeps counts and the first 10 indices only: stacks can have millions of frames."""

    def __init__(self):
        self.n = self.n_constant = self.n_negative = 0
        self.constant, self.negative = [], []

    def add(self, frames: torch.Tensor, first: int) -> None:
        centre = frames[:, frames.size(1) // 2].flatten(1)
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
            _warn(f"{self.n_constant} of {self.n} frames are constant images (e.g. frames {self.constant}); "
                  "they hold no emitters.")
        if self.n_negative:
            _warn(f"{self.n_negative} frames have a negative median (e.g. {self.negative}): frames in photons "
                  "should have a background >= 0. Check Camera.convert2photons and the camera baseline.")


def _warn(msg: str) -> None:
    print(f"[decode-var] {msg}", file=sys.stderr, flush=True)


def fit(param_file, model, frames, out, batch_size=64, device="cpu", mask_nonfinite=False, trusted=False,
        progress=True):
    """Fit ``frames`` (a TIFF stack) with ``model``; write the emitters to ``out``; returns them.

    Input guards (before the model sees a frame): pixel type (integers or floats), NaN / Inf pixels
    (error, or ``mask_nonfinite``), negative raw counts when ``Camera.convert2photons`` (error), frame size
    that does not fit ``VAR.scales`` (error); constant frames and negative medians are reported at the end,
    a stack that is constant throughout is an error. Non-finite model outputs are an error naming the frames.
    """
    from .emitters import EmitterSet
    from .inference import Predictor, resolve_model_path
    from .param import load_param
    from .tiff import TiffStack, window_batches

    out = Path(out)
    if out.suffix not in (".h5", ".hdf5", ".csv", ".pt"):
        raise InputDataError(f"--out {out} must end in .h5, .csv or .pt (DECODE's emitter formats).")
    if batch_size < 1:
        raise InputDataError(f"--batch-size must be >= 1, got {batch_size}.")
    param = load_param(param_file)
    stack = TiffStack(frames)
    if len(stack) == 0:
        raise InputDataError(f"{frames} holds no frames.")
    check_stack_dtype(stack.dtype, frames)
    pred = Predictor(param, resolve_model_path(model), device, trusted)
    _check_frame_size(pred, stack.shape[1:], frames)
    n_total = len(stack)
    adu = bool(param.Camera.convert2photons)
    report = _StackReport()
    ems = []
    it = window_batches(stack, batch_size, pred.channels_in)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=(n_total + batch_size - 1) // batch_size, desc="fitting", unit="batch")
    for centre, frames_NCHW in it:
        first = int(centre[0])
        frames_NCHW = check_stack_values(frames_NCHW, first, mask_nonfinite, adu, n_total)
        report.add(frames_NCHW, first)
        ems.append(pred.predict(pred.adu_to_photons(frames_NCHW), first_frame=first, batch_size=batch_size))
    report.finish(frames)
    em = EmitterSet.cat(ems)
    if em.px_size is None:
        em.px_size = torch.tensor(param.Camera.px_size, dtype=torch.float32)
    pred.backend.save_emitters(out, em)
    return em


def _check_frame_size(pred, hw, path) -> None:
    """The frames must give a whole number of cells on every output scale (e.g. multiples of 4 px for 0.25)."""
    from .errors import ShapeError
    from .scales import ScaleSchedule

    try:
        ScaleSchedule(tuple(int(v) for v in hw), pred.param.VAR.scales)
    except (ShapeError, ValueError) as err:  # ParamError is a ValueError
        raise InputDataError(f"Frames of {path} are {hw[0]} x {hw[1]} px, which the model's scales "
                             f"{pred.param.VAR.scales} cannot divide ({err}). Crop or pad the stack to a size "
                             "that fits, e.g. a multiple of 4 px for a 0.25 scale.") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        em = fit(args.param_file, args.model, args.frames, args.out, args.batch_size, args.device,
                 args.mask_nonfinite, args.trust_pickle, not args.no_progress)
    except DecodeVarError as err:
        print(f"decode-var-fit: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(em)} emitters to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
