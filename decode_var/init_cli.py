"""``decode-var-init``: estimate the simulation's param from the user's own movie.

    decode-var-init --frames movie.tif --param known.yaml --out param.yaml [--force] [--max-frames 500]

``known.yaml`` is a partial param in DECODE's format with what the user knows (the ``Camera`` keys,
``px_size``; optionally a spline calibration, ``VAR.psf: spline`` + ``InOut.calibration_file``, or
``VAR.gaussian_psf.mode_3d: false`` for a 2D PSF). Keys it gives are kept; the rest is estimated from a sample
of the movie (:mod:`decode_var.data.init_param`): the camera's conversion and baseline (photon transfer; a
given key that disagrees by more than 25 % is warned about, naming the key and both values), the background
(``bg_uniform``, Perlin keys, drift), the emitters (``intensity_mu_sig``, ``emitter_av``, ``lifetime_avg``) and
a Gaussian PSF's width (and astigmatism); frame size and pixel size come from the movie (OME-TIFF,
Micro-Manager, ImageJ metadata). Every key written carries a comment with its source.

The param is written atomically; an existing ``--out`` is replaced only with ``--force``, and never when it is
``known.yaml`` or the movie. Next to it, ``<out>_report.png`` compares the movie with a simulation of the param.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from decode_var.config.commented_yaml import dump_commented
from decode_var.config.param import UniqueKeyLoader, load_param, param_from_dict
from decode_var.core.atomic import atomic_write_text
from decode_var.core.errors import DecodeVarError, OutputError, exit_status
from decode_var.core.log import warn
from decode_var.core.outputs import check_outputs
from decode_var.data import init_param as ip
from decode_var.data.tiff import open_stack
from decode_var.data.tiff_metadata import pixel_size_nm
from decode_var.evaluation.init_report import save_init_report

PROG = "decode-var-init"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="Estimate the simulation param from your movie.")
    p.add_argument("--frames", required=True, help="the movie: a TIFF stack or a folder of TIFF files (raw ADU)")
    p.add_argument("--param", required=True, help="known.yaml: a partial param with what you know (Camera keys, "
                                                  "px_size, optionally a spline calibration or a 2D PSF)")
    p.add_argument("--out", required=True, help="the complete param to write (.yaml); <out>_report.png next to it")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never known.yaml or the movie)")
    p.add_argument("--max-frames", type=int, default=500,
                   help="frames of the movie measured at most, in evenly spaced blocks (default 500)")
    p.add_argument("--no-report", action="store_true", help="do not write <out>_report.png")
    return p.parse_args(argv)


def report_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "_report.png")


def _check(args) -> None:
    outs = [args.out] + ([] if args.no_report else [report_path(args.out)])
    check_outputs(outs, {"--param": args.param, "--frames": args.frames})
    if Path(args.out).suffix not in (".yaml", ".yml"):
        raise OutputError(f"cannot write {args.out}: a param file must end in .yaml or .yml.")
    if Path(args.out).exists() and not args.force:
        raise OutputError(f"{args.out} exists; give --force to replace it, or another --out.")
    if args.max_frames < 20:
        raise OutputError(f"--max-frames {args.max_frames}: decode-var-init needs at least 20 frames.")


def _read_known(path) -> dict:
    """known.yaml, validated as a param (:func:`load_param`), as the user wrote it (which keys are given)."""
    load_param(path)
    return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)


def _header(args, shape, n_sample: int) -> str:
    T, H, W = shape
    return (f"decode-var-init --frames {args.frames} --param {args.param}\n"
            f"Estimated from {n_sample} of the movie's {T} frames ({H} x {W} px). Keys known.yaml gives are kept\n"
            "('given'); each other key says how it was estimated. Keys not listed take decode-var's defaults\n"
            "(param/reference.yaml)." + ("" if args.no_report else f" Check the report: {report_path(args.out).name}"))


def run(args) -> tuple[ip.InitResult, dict]:
    """Estimate and write; returns the result and the data written."""
    raw = _read_known(args.param)
    with open_stack(args.frames) as stack:
        shape = tuple(stack.shape)
        adu, frame_BT = ip.sample_blocks(stack, max_pixels=args.max_frames * shape[1] * shape[2])
    res = ip.estimate(adu, frame_BT, shape[0], raw, pixel_size_nm(args.frames))
    data = ip.param_data(raw, res.keys)
    param = param_from_dict(data, source=str(args.out))  # what is written loads: checked before writing
    if not args.no_report:  # simulated before anything is written
        real = ip.summarize(res.photons_BTHW, res.spots)
        sim = ip.simulated_summary(param, res.roi, n_frames=min(300, frame_BT.numel()))
    notes = {path: key.note for path, key in res.keys.items()}
    atomic_write_text(args.out, dump_commented(data, notes, _header(args, shape, frame_BT.numel())))
    if not args.no_report:
        save_init_report(report_path(args.out), real, sim, [f"decode-var-init: {args.frames} against {args.out}"]
                         + [f"warning: {w[:150]}" for w in res.warnings])
    return res, data


def _summary(res: ip.InitResult) -> str:
    keys = res.keys
    return "; ".join(f"{path.split('.')[-1]} {keys[path].value}" for path in (
        "Camera.e_per_adu", "Camera.em_gain", "Camera.baseline", "Simulation.intensity_mu_sig",
        "Simulation.emitter_av", "Simulation.lifetime_avg", "Simulation.bg_uniform", "VAR.gaussian_psf.sigma_0")
        if path in keys)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        _check(args)
        res, _ = run(args)
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status(PROG, err, kept="nothing was written")
    for w in res.warnings:
        warn(w)
    n_est = sum(key.estimated for key in res.keys.values())
    print(f"wrote {args.out} ({n_est} keys estimated from the movie): {_summary(res)}"
          + ("" if args.no_report else f"; report {report_path(args.out)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
