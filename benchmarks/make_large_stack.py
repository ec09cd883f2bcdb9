"""A large simulated acquisition to try ``decode-var-fit`` on: a TIFF in ADU and its ground truth.

    python benchmarks/make_large_stack.py -p out/quickstart/<exp>/param_run.yaml --size 256 --frames 20 --out DIR
    decode-var-fit  -p <exp>/param_run.yaml --model <exp>/model.pt --frames DIR/stack.tif --out DIR/emitters.h5
    decode-var-eval -p <exp>/param_run.yaml --model <exp>/model.pt --frames DIR/stack.tif --emitters DIR/gt.csv --out DIR/ev

The param's physics (PSF, camera, photons, background) at its emitter density per px (the quickstart's 6 per
40 x 40 px), on ``size`` x ``size`` px frames, each frame an independent seeded sample (``DIR/stack.tif``, uint16
ADU; ``DIR/gt.csv``: emitters with at least ``HyperParameter.emitter_label_photon_min`` photons, x = row).
"""
import argparse
from pathlib import Path

import numpy as np
import tifffile
import torch

from decode_var.data.emitter_io import save_emitters
from decode_var.core.emitters import EmitterSet
from decode_var.config.param import load_param, param_from_dict
from decode_var.data.simulation import Simulator


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--param", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    param = load_param(args.param)
    d, s = param.to_dict(), args.size
    train_px = param.Simulation.img_size[0] * param.Simulation.img_size[1]
    ext = [[-0.5, s - 0.5], [-0.5, s - 0.5]]
    d["Simulation"].update(img_size=[s, s], psf_extent=ext + [None],
                           emitter_extent=ext + [list(d["Simulation"]["emitter_extent"][2])],
                           emitter_av=float(np.mean(param.Simulation.emitter_av)) * s * s / train_px)
    d["Camera"]["convert2photons"] = False  # the simulator then returns ADU
    sim = Simulator.parse(param_from_dict(d))
    frames, ems = [], []
    for i in range(args.frames):
        b = sim.sample(1, seed=args.seed + i)
        frames.append(b.frames_NCHW[0, sim.frame_window // 2])
        b.em.frame_ix = b.em.frame_ix + i
        ems.append(b.em)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out / "stack.tif", torch.stack(frames).clamp(0, 65535).round().numpy().astype(np.uint16),
                     photometric="minisblack")
    gt = EmitterSet.cat(ems)
    if param.HyperParameter.emitter_label_photon_min is not None:
        gt = gt[gt.phot >= param.HyperParameter.emitter_label_photon_min]
    save_emitters(out / "gt.csv", gt)
    print(f"wrote {out / 'stack.tif'} ({args.frames} frames of {s} x {s} px) and {out / 'gt.csv'} ({len(gt)} emitters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
