"""``decode-var-make-calibration``: a SMAP-style cubic-spline calibration (.mat) from a PSF model.

    decode-var-make-calibration --out spline_demo_3dcal.mat [-p param.yaml] [--roi-size 21]
                                [--z-range -800 800] [--dz 50]

The model is the package's astigmatic Gaussian (``VAR.gaussian_psf`` of ``-p``, or the flags below). The
spline is fitted to it voxel by voxel and written in SMAP's structure (``SXY.cspline.{coeff, dz, z0, x0}``),
which DECODE's ``SMAPSplineCoefficient`` and decode-var's built-in spline PSF both read: nothing to
download, and a known PSF behind the spline for tests and demos. For real data use SMAP's calibration.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from decode_var.config.param import load_param
from decode_var.core.errors import DecodeVarError, exit_status
from decode_var.core.outputs import check_outputs
from decode_var.data.spline_psf import gaussian_pixel_model, make_calibration, save_calibration


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decode-var-make-calibration",
                                description="Write a SMAP-style spline calibration fitted to a Gaussian PSF model.")
    p.add_argument("--out", required=True, help="calibration file to write (.mat)")
    p.add_argument("-p", "--param-file", default=None, help="take the PSF from this param's VAR.gaussian_psf")
    p.add_argument("--sigma-0", type=float, default=1.0, help="in-focus width, px (default 1.0)")
    p.add_argument("--foc-shift", type=float, default=250.0, help="astigmatic focal shift, nm (default 250)")
    p.add_argument("--rl-range", type=float, default=280.0, help="Rayleigh range, nm (default 280)")
    p.add_argument("--2d", dest="two_d", action="store_true", help="no astigmatism (width sigma_0 at every z)")
    p.add_argument("--roi-size", type=int, default=21, help="odd ROI edge, px (default 21)")
    p.add_argument("--z-range", type=float, nargs=2, default=(-800.0, 800.0), metavar=("LOW", "HIGH"),
                   help="z the calibration covers, nm (default -800 800)")
    p.add_argument("--dz", type=float, default=50.0, help="voxel height, nm (default 50)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_outputs([args.out], {"-p": args.param_file})
        if args.param_file:
            g = load_param(args.param_file).VAR.gaussian_psf
            sigma_0, foc_shift, rl_range, mode_3d = g.sigma_0, g.foc_shift, g.rl_range, g.mode_3d
        else:
            sigma_0, foc_shift, rl_range, mode_3d = args.sigma_0, args.foc_shift, args.rl_range, not args.two_d
        calib = make_calibration(gaussian_pixel_model(sigma_0, foc_shift, rl_range, mode_3d), args.roi_size,
                                 args.z_range, args.dz)
        save_calibration(args.out, calib)
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status("decode-var-make-calibration", err, kept="nothing was written")
    nx, ny, nz = calib.shape
    print(f"wrote {args.out}: {nx} x {ny} px x {nz} voxels of {calib.dz_nm:g} nm, z {calib.z_range_nm[0]:g} .. "
          f"{calib.z_range_nm[1]:g} nm (Gaussian sigma_0 {sigma_0} px, foc_shift {foc_shift} nm, "
          f"rl_range {rl_range} nm{'' if mode_3d else ', 2D'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
