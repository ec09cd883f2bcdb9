"""What ``VAR.merge_px`` (one localization per emitter, docs/fitting.md) changes for a trained model: the same maps
post-processed with several values, scored on the protocol's seeded test set.

    python benchmarks/bench_merge.py EXP [--n 512] [--density 30] [--merge 0 0.25 0.5 1]

``EXP``: an experiment folder (``param_run.yaml`` + ``model.pt``). ``--density``: emitters per training frame of
the test set (default: the param's ``Simulation.emitter_av``); ``--n``: its samples (default ``TestSet.test_size``).
The model runs once; only the post-processing differs between the rows, so the comparison is paired.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from decode_var.config.param import load_param
from decode_var.eval_cli import simulated_test_set
from decode_var.inference.predictor import Predictor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exp", type=Path)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--density", type=float, default=None)
    ap.add_argument("--merge", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    args = ap.parse_args(argv)
    param = load_param(args.exp / "param_run.yaml")
    if args.density is not None:
        param.Simulation.emitter_av = args.density
    base = Predictor(param, args.exp / "model.pt")
    frames, gt = simulated_test_set(base.parts.protocol, base.parts.simulator, args.n)
    maps = base.output(frames)
    for merge in args.merge:
        param.VAR.merge_px = merge
        pred = Predictor(param, args.exp / "model.pt")
        em = pred.emitters(maps, 0, tuple(frames.shape[-2:]))
        m, _ = pred.parts.protocol.score(pred.backend, pred.parts.matcher, em, gt)
        print(f"merge_px {merge:g}: jac {m['jac']:.4f} prec {m['prec']:.3f} rec {m['rec']:.3f} "
              f"rmse_lat {m['rmse_lat']:.2f} nm rmse_ax {m['rmse_ax']:.1f} nm localizations {int(m['n_pred'])}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
