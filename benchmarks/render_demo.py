"""Render demo: a simulated structure (rings and lines, z colour-coded), fitted and rendered.

    python benchmarks/render_demo.py --model out/quickstart/<exp>/model.pt -p out/quickstart/<exp>/param_run.yaml
    python benchmarks/render_demo.py            # no model: renders the ground truth, and says so

Simulates a movie with the package's simulator parts for the param's PSF and camera (``Simulator.parse``:
PSF, camera noise, ADU), blinking emitters drawn on three tilted rings and two lines (z from -500 to 500 nm),
writes it as a uint16 TIFF, fits it with ``decode-var-fit`` and renders the localizations with
``decode_var.inference.render`` (Gaussian, 10 nm px). Without ``--model`` the ground-truth localizations are rendered
instead; the title of the image and the printed summary say which it is. Every random draw comes from
``--seed``.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def structure_points(n: int, frame_px: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3) points on three tilted rings (r = 700 nm) and two lines; x, y in px (100 nm), z in nm."""
    kind = torch.randint(0, 5, (n,), generator=gen)
    t = torch.rand(n, generator=gen)
    xyz = torch.zeros(n, 3)
    c = frame_px / 2
    centres = torch.tensor([[c - 9.0, c - 8.0], [c - 8.0, c + 9.0], [c + 8.5, c - 2.0]])
    for k in range(3):  # rings: z follows the angle (a tilted ring)
        m = kind == k
        a = 2 * math.pi * t[m]
        xyz[m, 0] = centres[k, 0] + 7.0 * torch.cos(a)
        xyz[m, 1] = centres[k, 1] + 7.0 * torch.sin(a)
        xyz[m, 2] = 450.0 * torch.sin(a + k)
    for k, (p0, p1) in enumerate((((c + 2.0, 3.0), (c + 17.0, frame_px - 4.0)), ((3.0, c + 1.0), (c - 1.0, c + 3.0)))):
        m = kind == 3 + k
        xyz[m, 0] = p0[0] + (p1[0] - p0[0]) * t[m]
        xyz[m, 1] = p0[1] + (p1[1] - p0[1]) * t[m]
        xyz[m, 2] = -500.0 + 1000.0 * t[m]
    return xyz


def simulate(param, n_frames: int, per_frame: float, seed: int):
    """Frames in ADU (n_frames, H, W) uint16 and the ground truth EmitterSet (x, y px, z nm, one row per frame on).

    Emitters blink as in training (``Simulator``): each is switched on at a uniform time for an exponential
    time of mean ``Simulation.lifetime_avg`` frames and gives each frame ``flux * (time on in that frame)``.
    """
    from decode_var.core.emitters import EmitterSet
    from decode_var.data.simulation import Camera, Simulator

    gen = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in param.Simulation.img_size)
    sim = Simulator.parse(param)
    life = float(param.Simulation.lifetime_avg)
    n = int(torch.poisson(torch.tensor(float(per_frame) * n_frames / (life + 1)), generator=gen))
    xyz = structure_points(n, min(h, w), gen)
    xyz = xyz + torch.randn(xyz.shape, generator=gen) * torch.tensor([0.08, 0.08, 20.0])  # label size
    mu, sd = (float(v) for v in param.Simulation.intensity_mu_sig)
    flux = (mu + sd * torch.randn(n, generator=gen)).clamp(min=500.0)
    t0 = torch.rand(n, generator=gen) * n_frames
    te = t0 - life * torch.log(torch.rand(n, generator=gen))  # exponential on-time
    frame_ix, emitter, phot = [], [], []
    for f in range(n_frames):
        on = (torch.minimum(te, torch.tensor(f + 1.0)) - torch.maximum(t0, torch.tensor(float(f)))).clamp(min=0)
        e = torch.nonzero(on > 0).flatten()
        frame_ix.append(torch.full((len(e),), f))
        emitter.append(e)
        phot.append(flux[e] * on[e])
    frame_ix, emitter, phot = torch.cat(frame_ix), torch.cat(emitter), torch.cat(phot)
    expected = sim.psf.forward(xyz[emitter], phot, frame_ix, n_frames)
    lo, hi = (param.Simulation.bg_uniform if isinstance(param.Simulation.bg_uniform, (list, tuple))
              else [param.Simulation.bg_uniform] * 2)
    bg = float(lo) + (float(hi) - float(lo)) * 0.25
    c = param.Camera
    camera = Camera(c.qe, c.spur_noise, c.em_gain, c.e_per_adu, c.baseline, c.read_sigma, photon_units=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        adu = camera.forward(expected + bg)
    gt = EmitterSet(xyz[emitter], phot, frame_ix, id=emitter, bg=torch.full((len(frame_ix),), bg),
                    px_size=param.Camera.px_size)
    return adu.clamp(0, 65535).round().numpy().astype(np.uint16), gt


def score(param, em, gt) -> str:
    """Jaccard and lateral RMSE against the ground truth (the package's matching; emitters dimmer than
    ``HyperParameter.emitter_label_photon_min`` are not counted, as in evaluation)."""
    from decode_var.backend import get_backend

    backend = get_backend(param.VAR.backend)
    floor = param.HyperParameter.emitter_label_photon_min
    gt = gt[gt.phot >= floor] if floor is not None else gt
    tp, fp, fn, tp_match = backend.matcher(param).forward(em, gt)
    m = backend.evaluate(tp, fp, fn, tp_match)
    return f"Jaccard {float(m['jac']):.2f}, RMSE lat {float(m['rmse_lat']):.0f} nm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="trained model.pt (without it: the ground truth is rendered)")
    ap.add_argument("-p", "--param", default=None, help="the model's param_run.yaml (default: the quickstart param)")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--per-frame", type=float, default=5.0, help="emitters on per frame")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "render_demo.png"))
    args = ap.parse_args(argv)
    import tifffile

    from decode_var.config.param import load_param
    from decode_var.inference.render import render, save_render

    param_file = args.param or str(ROOT / "decode_var" / "param" / "var_quickstart.yaml")
    param = load_param(param_file)
    frames, gt = simulate(param, args.frames, args.per_frame, args.seed)
    h, w = frames.shape[1:]
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "structure.tif"
        tifffile.imwrite(tif, frames, photometric="minisblack")
        if args.model:
            out = Path(tmp) / "fit.h5"
            cmd = [sys.executable, "-m", "decode_var.fit", "-p", param_file, "--model", args.model, "--frames", str(tif),
                   "--out", str(out), "--no-progress"]
            subprocess.run(cmd, check=True)
            from decode_var.data.emitter_io import load_emitters

            em = load_emitters(out)
            what = f"fitted ({Path(args.model).parent.name}/{Path(args.model).name}): {len(em)} localizations"
            what += ", " + score(param, em, gt)
        else:
            em = gt
            what = f"GROUND TRUTH, not fitted (no --model): {len(em)} emitters"
        r = render(em, (h, w), param.Camera.px_size, px_nm=10.0, mode="gaussian", z_range=(-500, 500))
        title = f"{what}; {args.frames} frames, {len(gt)} true"
        save_render(r, args.out, Path(tmp) / "render.tif", title=title)  # the float TIFF is not kept
    print(f"{title}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
