"""Fit simulated TIFF movies the way a user would; compare with a classical Gaussian MLE fitter.

    python benchmarks/bench_movie.py --model [NAME=]EXP_DIR [--model ...] [--code NAME=SRC] [--frames 1000]
                                     [--densities 2 6 15] [--backgrounds const per_frame smooth] [--out DIR]

Movies are continuous (not windows): emitters blink across frames as DECODE's
``EmitterSamplerBlinking`` draws them (uniform start times, exponential on-times of
``Simulation.lifetime_avg`` frames, about ``density`` emitters on per frame), rendered with the
package's PSF and camera (``decode_var.data.simulation``) from the model's own ``param_run.yaml``, and written
as uint16 ADU TIFFs. Backgrounds, photons / px:

- ``const``: spatially flat, one level per stretch of 100 frames, drawn from ``Simulation.bg_uniform``;
- ``per_frame``: spatially flat, a new level every frame, drawn from ``Simulation.bg_uniform``;
- ``smooth``: ``(40 + 120 * Perlin)`` (3 lattice cells across the frame, fixed over the movie) times
  a bleaching factor that falls linearly from 1 to 0.6 over the movie.

Each model fits each movie with ``decode-var-fit`` (a subprocess, as a user runs it); the output is
scored with the package's matching (``Evaluation`` of the param: 3D, 250 nm lateral, 500 nm axial)
against the emitters with at least ``HyperParameter.emitter_label_photon_min`` photons in a frame
(what the model is trained to report). Noise: the standard error of the Jaccard index over blocks
of 100 frames.

The classical baseline fits an elliptical, pixel-integrated Gaussian (x, y, photons, bg, sigma_x,
sigma_y) by Poisson maximum likelihood (Levenberg-Marquardt-damped Fisher scoring, 12 iterations,
vectorised over all ROIs) on 7 x 7 px ROIs around local maxima of the Gaussian-filtered,
background-subtracted frame, and maps (sigma_x, sigma_y) to z through the astigmatic calibration
curve of the param's Gaussian PSF; it is scored with the same 3D matching. Its detection threshold
is tuned for the best Jaccard on a separate movie (another seed, 6 emitters / frame, background
redrawn per frame) and then fixed for all movies.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from decode_var.data.emitter_io import load_emitters
from decode_var.core.emitters import EmitterSet
from decode_var.evaluation.matching import GreedyHungarianMatching, evaluate, precision_recall_jaccard
from decode_var.config.param import load_param
from decode_var.data.movie import blinking_emitters
from decode_var.data.simulation import Camera, Simulator, astigmatism, perlin_NHW
# the classical fitter's pieces live in the package (decode-var-init measures movies with them); the names
# stay importable from here
from decode_var.data.spots import cut_rois, detect, integrated_1d as _integrated_1d, mle_fit  # noqa: F401

BG_KINDS = ("const", "per_frame", "smooth")
DENSITIES = (2.0, 6.0, 15.0)
TUNE = (6.0, "per_frame", 999)  # density, background, seed of the classical fitter's tuning movie
THRESHOLDS = (15.0, 20.0, 24.0, 27.0, 31.0, 35.0, 45.0, 60.0, 80.0, 100.0, 130.0)  # photons / px, filtered peak
BLOCK = 100  # frames per block for the standard errors


# ------------------------------------------------------------------------------------------ movies
def movie_background(kind: str, n_frames: int, img_shape, bg_lo: float, bg_hi: float) -> torch.Tensor:
    """(F, H, W) background, photons / px (global RNG); see the module docstring for the kinds."""
    if kind == "per_frame":
        level_F = bg_lo + torch.rand(n_frames) * (bg_hi - bg_lo)
    elif kind == "const":
        level_F = (bg_lo + torch.rand((n_frames + BLOCK - 1) // BLOCK) * (bg_hi - bg_lo)).repeat_interleave(BLOCK)
        level_F = level_F[:n_frames]
    elif kind == "smooth":
        field_HW = 40.0 + 120.0 * perlin_NHW(1, img_shape, 3)[0]
        bleach_F = torch.linspace(1.0, 0.6, n_frames)
        return bleach_F[:, None, None] * field_HW[None]
    else:
        raise ValueError(f"background kind {kind!r}: use one of {BG_KINDS}")
    return level_F[:, None, None].expand(n_frames, *img_shape).clone()


def simulate_movie(param, n_frames: int, density: float, bg_kind: str, seed: int):
    """uint16 ADU frames (F, H, W) and the ground truth (EmitterSet, px, nm) with the param's physics."""
    sim = Simulator.parse(param)
    c = param.Camera
    camera = Camera(c.qe, c.spur_noise, c.em_gain, c.e_per_adu, c.baseline, c.read_sigma, photon_units=False)
    bg = param.Simulation.bg_uniform
    bg_lo, bg_hi = (bg if isinstance(bg, (list, tuple)) else (bg, bg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        xyz, phot, frame, ident = blinking_emitters(sim, n_frames, density)
        expected_FHW = sim.psf.forward(xyz, phot, frame, n_frames)
        img_shape = tuple(expected_FHW.shape[-2:])
        expected_FHW = expected_FHW + movie_background(bg_kind, n_frames, img_shape, float(bg_lo), float(bg_hi))
        adu_FHW = camera.forward(expected_FHW)
    frames = adu_FHW.clamp(0, 65535).round().numpy().astype(np.uint16)
    gt = EmitterSet(xyz, phot, frame, id=ident, px_size=param.Camera.px_size)
    photon_min = param.HyperParameter.emitter_label_photon_min
    if photon_min is not None:
        gt = gt[gt.phot >= photon_min]
    return frames, gt


# ------------------------------------------------------------------------------ classical fitter
def z_from_widths(sigma_E2: torch.Tensor, sigma_0: float, foc_shift: float, rl_range: float,
                  z_range=(-750.0, 750.0)) -> torch.Tensor:
    """(E,) z in nm whose astigmatic widths (the param's Gaussian PSF) are nearest to the fitted ones."""
    z_Z = torch.arange(z_range[0], z_range[1] + 1e-3, 5.0)
    curve_Z2 = astigmatism(z_Z, sigma_0, foc_shift, rl_range).double()
    d_EZ = ((sigma_E2[:, None, :] - curve_Z2[None]) ** 2).sum(-1)
    return z_Z[d_EZ.argmin(1)]


def classical_fit(frames_FHW: np.ndarray, param, threshold: float, roi: int = 7) -> EmitterSet:
    """Detect local maxima and fit each by Gaussian MLE; an EmitterSet in px (x = row) and nm."""
    c = param.Camera
    camera = Camera(c.qe, c.spur_noise, c.em_gain, c.e_per_adu, c.baseline, c.read_sigma, photon_units=False)
    photons_FHW = camera.backward(torch.from_numpy(frames_FHW.astype(np.float32)))
    f, r, col = detect(photons_FHW, threshold)
    roi_ERR = cut_rois(photons_FHW, f, r, col, roi)
    thetas = [mle_fit(part) for part in roi_ERR.split(20000)] if len(f) else []
    theta = torch.cat(thetas) if thetas else torch.zeros(0, 6, dtype=torch.float64)
    # a fit that wandered more than 1.5 px found a neighbour's emitter (or nothing): that maximum is dropped
    keep = (theta[:, :2].abs() <= 1.5).all(1) & torch.isfinite(theta).all(1)
    theta, f, r, col = theta[keep], f[keep], r[keep], col[keep]
    g = param.VAR.gaussian_psf
    if g.mode_3d:
        z = z_from_widths(theta[:, 4:], g.sigma_0, g.foc_shift, g.rl_range, param.Simulation.emitter_extent[2])
    else:
        z = torch.zeros(len(theta))
    xyz = torch.stack([r + theta[:, 0], col + theta[:, 1], z.double()], 1).float()
    return EmitterSet(xyz, theta[:, 2].float(), f, bg=theta[:, 3].float(), px_size=param.Camera.px_size)


# ---------------------------------------------------------------------------------------- scoring
def score(param, em_out: EmitterSet, gt: EmitterSet, n_frames: int) -> dict:
    """The package's matching and metrics, plus the standard error of the Jaccard over 100-frame blocks."""
    tp, fp, fn, tp_match = GreedyHungarianMatching.parse(param).forward(em_out, gt)
    m = evaluate(tp, fp, fn, tp_match)
    n_blocks = max(1, n_frames // BLOCK)
    block_jac = []
    for k in range(n_blocks):
        def count(em):
            return int(((em.frame_ix // BLOCK) == k).sum())
        block_jac.append(precision_recall_jaccard(count(tp), count(fp), count(fn))[2])
    m["jac_se"] = float(np.std(block_jac, ddof=1) / math.sqrt(n_blocks)) if n_blocks > 1 else float("nan")
    m["per_frame_out"] = len(em_out) / n_frames
    m["per_frame_gt"] = len(gt) / n_frames
    return {k: float(v) for k, v in m.items()}


def fit_with_cli(exp_dir: Path, tif: Path, out: Path, code: Optional[str] = None) -> tuple[EmitterSet, float]:
    """``decode-var-fit`` on the movie, as a user runs it; returns the emitters and the wall time (s).

    ``code``: a source tree whose ``decode_var`` runs the fit (the code the model was trained with)."""
    exp_dir, tif, out = exp_dir.resolve(), tif.resolve(), out.resolve()
    cmd = [sys.executable, "-m", "decode_var.fit", "-p", str(exp_dir / "param_run.yaml"),
           "--model", str(exp_dir / "model.pt"), "--frames", str(tif), "--out", str(out), "--no-progress"]
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code).resolve())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                          else []))
    t0 = time.perf_counter()
    # run outside the repository: `python -m` puts the working directory first on sys.path, and a checkout's
    # decode_var would shadow ``code``
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(out.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return load_emitters(out), time.perf_counter() - t0


def tune_threshold(param, n_frames: int) -> tuple[float, list]:
    """The detection threshold (photons / px) with the best Jaccard on the tuning movie, and the sweep."""
    density, bg_kind, seed = TUNE
    frames, gt = simulate_movie(param, n_frames, density, bg_kind, seed)
    sweep = []
    for th in THRESHOLDS:
        m = score(param, classical_fit(frames, param, th), gt, n_frames)
        sweep.append({"threshold": th, "jac": m["jac"], "prec": m["prec"], "rec": m["rec"]})
        print(f"  tune threshold {th:5.1f} photons/px: jac {m['jac']:.3f} prec {m['prec']:.3f} rec {m['rec']:.3f}",
              flush=True)
    best = max(sweep, key=lambda s: s["jac"])
    return best["threshold"], sweep


def main(argv=None) -> int:
    import tifffile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True,
                    help="experiment folder (param_run.yaml + model.pt), optionally NAME=FOLDER; repeatable")
    ap.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                    help="fit model NAME with the decode_var of source tree DIR (the code it was trained with, "
                         "e.g. a `git archive` of that commit); default: the installed package")
    ap.add_argument("--frames", type=int, default=1000, help="frames per movie (default 1000)")
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    ap.add_argument("--backgrounds", nargs="+", default=list(BG_KINDS), choices=BG_KINDS)
    ap.add_argument("--seed", type=int, default=2026, help="seed of the first movie (the others count up)")
    ap.add_argument("--out", default="out/bench_movie")
    ap.add_argument("--no-classical", action="store_true", help="skip the classical baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = []
    for spec in args.model:
        name, _, folder = spec.rpartition("=")
        folder = Path(folder)
        models.append((name or folder.name, folder))
    code = dict(spec.split("=", 1) for spec in args.code)
    param = load_param(models[0][1] / "param_run.yaml")  # the movies follow the first model's physics
    results = {"frames": args.frames, "rows": [], "command": " ".join(sys.argv)}
    if not args.no_classical:
        th, sweep = tune_threshold(param, args.frames)
        results["classical_threshold"], results["classical_sweep"] = th, sweep
        print(f"classical fitter: threshold {th} photons / px (tuned on density {TUNE[0]}, {TUNE[1]} background, "
              f"seed {TUNE[2]})", flush=True)
    seed = args.seed
    for bg_kind in args.backgrounds:
        for density in args.densities:
            frames, gt = simulate_movie(param, args.frames, density, bg_kind, seed)
            tif = out / f"movie_{bg_kind}_{density:g}.tif"
            tifffile.imwrite(tif, frames)
            row = {"background": bg_kind, "density": density, "seed": seed, "n_gt": len(gt)}
            for name, folder in models:
                em, wall = fit_with_cli(folder, tif, out / f"fit_{name}_{bg_kind}_{density:g}.h5", code.get(name))
                row[name] = score(param, em, gt, args.frames)
                row[name]["wall_s"] = wall
            if not args.no_classical:
                t0 = time.perf_counter()
                em = classical_fit(frames, param, results["classical_threshold"])
                row["classical"] = score(param, em, gt, args.frames)
                row["classical"]["wall_s"] = time.perf_counter() - t0
            results["rows"].append(row)
            print(_line(row, [n for n, _ in models] + ([] if args.no_classical else ["classical"])), flush=True)
            (out / "movie.json").write_text(json.dumps(results, indent=1))
            tif.unlink()  # the movie is re-made from its seed on demand; keep the folder small
            seed += 1
    print("\n" + table(results))
    return 0


def _line(row, names) -> str:
    parts = [f"{row['background']:9s} {row['density']:4g}/frame"]
    for n in names:
        m = row[n]
        parts.append(f"{n}: jac {m['jac']:.3f}±{m['jac_se']:.3f} prec {m['prec']:.3f} rec {m['rec']:.3f} "
                     f"rmse_lat {m['rmse_lat']:.1f} nm")
    return " | ".join(parts)


def table(results: dict) -> str:
    """Markdown table: one row per movie and method."""
    lines = ["| background | emitters / frame | method | Jaccard (± s.e.) | precision | recall | RMSE lat (nm) | "
             "RMSE ax (nm) | reported / frame |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for name, m in row.items():
            if not isinstance(m, dict):
                continue
            lines.append(f"| {row['background']} | {row['density']:g} | {name} | {m['jac']:.3f} ± {m['jac_se']:.3f} | "
                         f"{m['prec']:.3f} | {m['rec']:.3f} | {m['rmse_lat']:.1f} | {m['rmse_ax']:.1f} | "
                         f"{m['per_frame_out']:.2f} (true {m['per_frame_gt']:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
