"""``decode-var-render``: a super-resolution image of an emitter file; ``decode-var-convert``: exports.

    decode-var-render emitters.h5 [--out render.png] [--px-size 10] [--mode gaussian|hist|precision] [--sigma NM]
                      [-p param_run.yaml] [--camera-px NM NM] [--frame-size SX SY] [--no-z-color]
    decode-var-convert emitters.h5 --format picasso|thunderstorm|decode --out PATH [-p param_run.yaml]
                      [--camera-px NM NM] [--frame-size SX SY] [--frames N]

Emitter files are DECODE's formats (.h5, .csv, .pt). The render writes a PNG and a float32 TIFF (same name,
.tif); see :mod:`decode_var.inference.render`. The conversion writes Picasso's ``*_locs.hdf5`` + ``.yaml`` or
ThunderSTORM's CSV, converting axes and pixel origin (see :mod:`decode_var.inference.export`). ``-p`` (the run's
param) gives the camera pixel size and the PSF model (widths of the exported PSF); ``--frame-size`` is the
camera frame in px (rows, columns); without it the field of view is taken from the localizations.

Both check their outputs before reading the emitters (:func:`decode_var.core.outputs.check_outputs`: a
writable folder, not a folder, not the emitter or param file) and end with one line on an error (exit 2)
or Ctrl-C (exit 130); the files are replaced only when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from decode_var.config.param import load_param
from decode_var.core.errors import DecodeVarError, exit_status
from decode_var.core.outputs import check_free_space, check_outputs, existing_folder
from decode_var.data.emitter_io import load_emitters
from decode_var.evaluation.crlb_scoring import CrlbModel
from decode_var.evaluation.model_card import load_card
from decode_var.inference.export import FORMATS, export, readable_rows
from decode_var.inference.render import render, save_render

#: Bytes written per render pixel: float32 TIFF pages (density, and z for 3D) and at most 3 in the PNG.
RENDER_BYTES_PER_PX = 11
#: Bytes of an export per byte of the emitter file read (the formats hold the same numbers, a few more columns).
EXPORT_BYTES_PER_INPUT_BYTE = 2


def _common(p):
    p.add_argument("emitters", help="emitter file (.h5, .csv, .pt; DECODE's formats)")
    p.add_argument("-p", "--param-file", default=None, help="the run's param (pixel size, PSF model)")
    p.add_argument("--camera-px", type=float, nargs=2, default=None, metavar=("X", "Y"),
                   help="camera pixel size, nm (default: the file's, else the param's Camera.px_size)")
    p.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("SX", "SY"),
                   help="camera frame size in px, rows and columns (default: the localizations' extent)")


def _load(args):
    param = load_param(args.param_file) if args.param_file else None
    px = args.camera_px or (param.Camera.px_size if param is not None else None)
    em = load_emitters(args.emitters, px_size=px)
    if args.camera_px:
        em.px_size = torch.tensor(args.camera_px, dtype=torch.float32)
    return em, param


def _inputs(args) -> dict:
    return {"emitter": args.emitters, "-p": args.param_file}


def _input_bytes(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:  # missing: the load says so
        return 0


def render_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="decode-var-render", description="Render an emitter file (PNG + float TIFF).")
    _common(p)
    p.add_argument("--out", default=None, help="PNG to write (default: <emitters>_render.png); the TIFF gets .tif")
    p.add_argument("--px-size", type=float, default=10.0, help="render pixel, nm (default 10)")
    p.add_argument("--mode", choices=("gaussian", "hist", "precision"), default="gaussian",
                   help="gaussian: every localization blurred by --sigma; hist: counts per pixel; precision: each "
                        "localization blurred by its own predicted sigma (models with VAR.model.uncertainty)")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian blur, nm (default: median precision, or 2 px)")
    p.add_argument("--no-z-color", action="store_true", help="grey-scale density even for 3D data")
    p.add_argument("--z-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="z colour scale, nm")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.emitters).with_name(Path(args.emitters).stem + "_render.png")
    try:
        check_outputs([out, out.with_suffix(".tif")], _inputs(args))
        em, _ = _load(args)
        r = render(em, args.frame_size, None, args.px_size, args.mode, args.sigma,
                   False if args.no_z_color else None, args.z_range)
        # the size is known once the field of view is: checked before anything is written
        check_free_space(existing_folder(out), RENDER_BYTES_PER_PX * r.density_HW.size)
        paths = save_render(r, out, title=f"{Path(args.emitters).name}: {len(em)} localizations, {args.mode}, "
                                          f"{args.px_size:g} nm px")
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status("decode-var-render", err, kept="nothing was written")
    print(f"wrote {', '.join(str(x) for x in paths)} ({r.density_HW.shape[0]} x {r.density_HW.shape[1]} px)")
    return 0


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="decode-var-convert",
                                description="Convert an emitter file for Picasso, ThunderSTORM or DECODE.")
    _common(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output file (picasso: *_locs.hdf5, thunderstorm: .csv, decode: "
                                                ".h5/.csv/.pt)")
    p.add_argument("--frames", type=int, default=None, help="frames of the movie (Picasso's yaml; default: last + 1)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        check_outputs([out] + ([out.with_suffix(".yaml")] if args.format == "picasso" else []), _inputs(args),
                      EXPORT_BYTES_PER_INPUT_BYTE * _input_bytes(args.emitters))
        em, param = _load(args)
        # the model card of the run's experiment folder, when there is one, calibrates the exported precision
        card = load_card(Path(args.param_file).parent) if args.param_file else None
        em, _ = readable_rows(em, args.frames, "decode-var-convert")  # so that the count printed is the count written
        psf = CrlbModel.parse(param) if param is not None else None
        path = export(em, out, args.format, args.frame_size, args.frames, None, psf, card)
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status("decode-var-convert", err, kept="nothing was written")
    print(f"wrote {len(em)} localizations to {path}" + (f" and {Path(path).with_suffix('.yaml')}"
                                                         if args.format == "picasso" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(render_main())
