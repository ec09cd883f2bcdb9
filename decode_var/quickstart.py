"""``decode-var-quickstart`` / ``python -m decode_var.quickstart``: the main job in one command.

Trains VARMultiScale + AdaptivePPXYZB with the param embedded in the package
(``decode_var/config/var_quickstart.yaml``: 40 x 40 px, astigmatic Gaussian PSF, EMCCD, CPU; no
calibration, nothing downloaded), then evaluates it on the seeded test set with DECODE's
post-processing, matching and metrics. Prints the metrics; the experiment folder holds the model,
checkpoint, curves, and ``eval/`` with ``metrics.json``, ``emitters.csv`` and ``report.png``.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from decode_var.core.errors import DecodeVarError, exit_status
from decode_var.eval_cli import run as run_eval
from decode_var.train import train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="decode-var-quickstart", description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", default="out/quickstart", help="parent folder of the experiment (default out/quickstart)")
    ap.add_argument("--epochs", type=int, default=None, help="override HyperParameter.epochs")
    ap.add_argument("--param", default=None, help="use this param file instead of the embedded one")
    args = ap.parse_args(argv)
    overrides = {"InOut": {"experiment_out": args.out}}
    if args.epochs is not None:
        overrides["HyperParameter"] = {"epochs": args.epochs}
    try:
        with resources.as_file(resources.files("decode_var.config").joinpath("var_quickstart.yaml")) as embedded:
            param_file = Path(args.param) if args.param else embedded
            trainer = train(param_file, log_comment="quickstart", no_log=True, overrides=overrides)
        exp = trainer.exp_dir
        metrics = run_eval(exp / "param_run.yaml", exp / "model.pt", exp / "eval")
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:  # a stopped training says how to resume it
        return exit_status("decode-var-quickstart", err)
    print("\nquickstart evaluation (seeded test set, "
          f"{int(metrics.get('n_gt', 0))} emitters):")
    for k in ("jac", "prec", "rec", "rmse_lat", "rmse_ax", "effcy_lat", "effcy_ax", "crlb_ratio_lat"):
        if k in metrics:
            unit = " nm" if k.startswith("rmse") else ""
            print(f"  {k:15s} {metrics[k]:.4f}{unit}")
    print(f"experiment folder: {exp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
