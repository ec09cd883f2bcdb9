"""``decode-var-fit``: localize emitters in a TIFF stack with a trained model.

    decode-var-fit -p param_run.yaml --model model.pt --frames stack.tif --out emitters.h5|csv|pt

Reads the stack lazily in batches (stacks larger than memory work; the batch size is chosen from a
memory budget, ``--max-memory``), pads the frame window at the stack ends as DECODE's ``Infer`` does (repeating the first / last frame), converts ADU to photons
when ``Camera.convert2photons`` is set, and writes DECODE's emitter file formats. The output is
written under a temporary name and renamed when complete: a failed run leaves no partial file.

Input guards (each a clear error with exit status 2, before the model sees the frame):

- pixel type: integers or floats; bool, complex and other types are refused;
- NaN / Inf pixels: refused with the frame indices, or with ``--mask-nonfinite`` replaced by the median
  of the frame's finite pixels;
- negative pixels while ``Camera.convert2photons`` is true (raw camera counts are never negative):
  refused; set ``convert2photons: false`` for frames already in photons;
- any frame size works (taken from the stack, the param is never edited); a size the finest
  output grid cannot divide is padded at the high border and emitters outside the frame dropped;
- constant frames and frames with a negative median: reported at the end; a stack that is constant
  throughout is refused (nothing to fit);
- non-finite model outputs: refused, naming the frames (``Predictor.output``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from decode_var.core.errors import DecodeVarError


def parse_args(argv=None):
    from decode_var.inference.predictor import add_model_arguments

    p = argparse.ArgumentParser(prog="decode-var-fit", description="Fit emitters in a TIFF stack.")
    add_model_arguments(p, frames_help=None)
    p.add_argument("--out", required=True, help="emitter file: .h5, .csv or .pt (DECODE's formats)")
    p.add_argument("--mask-nonfinite", action="store_true",
                   help="replace NaN/Inf pixels by the median of the frame's finite pixels instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    # issue 15: exports for other software and the super-resolution image, next to --out
    p.add_argument("--format", nargs="+", default=["decode"], choices=("decode", "picasso", "thunderstorm"),
                   help="also write <out>_locs.hdf5 + .yaml (picasso) and/or <out>_thunderstorm.csv; --out is "
                        "always DECODE's format (docs/spline_render_export.md)")
    p.add_argument("--no-render", action="store_true", help="do not write <out>_render.png / .tif")
    return p.parse_args(argv)


# the stack logic lives in decode_var.inference.stack; its public names stay importable from here
from decode_var.inference.stack import (check_block_values, check_stack_dtype, fit, localize_stack,  # noqa: E402
                                        resolve_batch_size)

__all__ = ["main", "parse_args", "fit", "localize_stack", "resolve_batch_size", "check_block_values",
           "check_stack_dtype"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        em = fit(args.param_file, args.model, args.frames, args.out, args.batch_size, args.device,
                 args.mask_nonfinite, args.trust_pickle, not args.no_progress, args.max_memory, args.compile)
    except DecodeVarError as err:
        print(f"decode-var-fit: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(em)} emitters to {args.out}")
    try:
        from decode_var.inference.export import write_fit_outputs

        extra = write_fit_outputs(args.param_file, em, args.out, args.frames, args.format, not args.no_render)
    except DecodeVarError as err:
        print(f"decode-var-fit: error: the emitters are saved in {args.out}, but {err}", file=sys.stderr)
        return 2
    if extra:
        print(f"wrote {', '.join(str(p) for p in extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
