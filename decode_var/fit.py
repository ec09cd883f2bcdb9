"""``decode-var-fit``: localize emitters in a TIFF stack with a trained model.

    decode-var-fit -p param_run.yaml --model model.pt --frames stack.tif --out emitters.h5|csv|pt

Reads the stack lazily in batches (stacks larger than memory work), pads the frame window at the
stack ends as DECODE's ``Infer`` does (repeating the first / last frame), converts ADU to photons
when ``Camera.convert2photons`` is set, and writes DECODE's emitter file formats. The output is
written under a temporary name and renamed when complete: a failed run leaves no partial file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DecodeVarError, InputDataError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decode-var-fit", description="Fit emitters in a TIFF stack.")
    p.add_argument("-p", "--param_file", required=True, help="the experiment's param_run.yaml")
    p.add_argument("--model", required=True, help="model.pt (or the experiment folder)")
    p.add_argument("--frames", required=True, help="TIFF stack (frames in ADU when Camera.convert2photons)")
    p.add_argument("--out", required=True, help="emitter file: .h5, .csv or .pt (DECODE's formats)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("-i", "--device", default="cpu")
    p.add_argument("--mask-nonfinite", action="store_true",
                   help="replace NaN/Inf pixels by the frame's median instead of stopping")
    p.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling of --model")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_stack_values(frames: torch.Tensor, first: int, mask_nonfinite: bool) -> torch.Tensor:
    """NaN/Inf pixels: error naming the frames, or (opt-in) replaced by the frame's finite median."""
    bad = ~torch.isfinite(frames)
    if bad.any():
        if not mask_nonfinite:
            # stack index of every bad (window, channel): channel c of window b is frame first + b + c - half,
            # clamped at the stack ends like the windows themselves
            half = (frames.size(1) - 1) // 2
            b, c = torch.nonzero(bad.flatten(2).any(-1), as_tuple=True)
            ix = sorted(set(torch.clamp(first + b + c - half, min=0).tolist()))[:10]
            raise InputDataError(f"frames {ix} of the stack contain NaN or Inf pixels. Repair them, or pass "
                                 "--mask-nonfinite to replace them by each frame's median.")
        frames = frames.clone()
        for i in range(frames.size(0)):
            for c in range(frames.size(1)):
                f = frames[i, c]
                ok = torch.isfinite(f)
                f[~ok] = f[ok].median() if ok.any() else 0.0
    return frames


def fit(param_file, model, frames, out, batch_size=64, device="cpu", mask_nonfinite=False, trusted=False,
        progress=True):
    from .emitters import EmitterSet
    from .inference import Predictor, resolve_model_path
    from .param import load_param
    from .tiff import TiffStack, window_batches

    out = Path(out)
    if out.suffix not in (".h5", ".hdf5", ".csv", ".pt"):
        raise InputDataError(f"--out {out} must end in .h5, .csv or .pt (DECODE's emitter formats).")
    param = load_param(param_file)
    pred = Predictor(param, resolve_model_path(model), device, trusted)
    stack = TiffStack(frames)
    if len(stack) == 0:
        raise InputDataError(f"{frames} holds no frames.")
    n_total = len(stack)
    ems = []
    it = window_batches(stack, batch_size, pred.channels_in)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=(n_total + batch_size - 1) // batch_size, desc="fitting", unit="batch")
    for centre, frames_NCHW in it:
        first = int(centre[0])
        frames_NCHW = check_stack_values(frames_NCHW, first, mask_nonfinite)
        const = frames_NCHW.flatten(2).std(-1).eq(0).all(-1)
        if const.all() and n_total > 1 and progress:
            print(f"[decode-var] frames {first}..{int(centre[-1])} are constant images", file=sys.stderr)
        ems.append(pred.predict(pred.adu_to_photons(frames_NCHW), first_frame=first, batch_size=batch_size))
    em = EmitterSet.cat(ems)
    if em.px_size is None:
        em.px_size = torch.tensor(param.Camera.px_size, dtype=torch.float32)
    pred.backend.save_emitters(out, em)
    return em


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
