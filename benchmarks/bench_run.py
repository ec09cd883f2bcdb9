"""``decode-var-run --minutes N`` on movies of other microscopes, against the classical fitter and a model trained
for the same time on the true param (issue 25's quality target; docs/your_data.md).

    python benchmarks/bench_run.py [--minutes 8] [--frames 1500] [--size 64] [--cases 0 3] [--out out/bench_run]

Each case is a continuous movie of ``bench_init.CASES`` (cameras and PSFs unlike the quickstart's; a smooth
background that fades by 30 %), written as a uint16 TIFF. Three localizers fit it, scored with the same matching
(the param's ``Evaluation``) against the emitters with at least ``HyperParameter.emitter_label_photon_min``
photons in a frame:

- **run**: ``decode-var-run --frames movie.tif --param known.yaml --minutes N`` (a subprocess, as a user runs it);
  known.yaml holds what a user knows: the camera keys, the pixel size and whether the PSF is 2D;
- **true**: the param that ``decode-var-run`` estimated, with every key that has a true value in the param's terms
  set to it (photons, emitters per frame on the training frame, on-time, the PSF's width and astigmatism; the
  camera is known.yaml's already; the background keeps its estimate, as a faded Perlin field has no one true
  ``bg_uniform``), trained with ``decode-var-train --minutes N`` and fitted with ``decode-var-fit``;
- **classical**: the Gaussian MLE fitter of ``bench_movie.py`` with the true PSF (z from the true astigmatic
  curve), at the best of its thresholds *on this movie's ground truth* (an upper bound for a classical user).

Noise: the standard error of the Jaccard over blocks of 100 frames. Both trainings use the CPU threads torch
takes by default (all cores); run nothing else meanwhile. ``--refit``: keep the trained models of an earlier run
in ``--out`` and fit the movies again (a change of the post-processing only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_init  # noqa: E402
from bench_movie import THRESHOLDS, classical_fit, score  # noqa: E402

from decode_var.config.param import load_param  # noqa: E402
from decode_var.data.emitter_io import load_emitters  # noqa: E402


def write_movie(case: tuple, n: int, size: int, seed: int, folder: Path):
    """The movie as ``folder/movie.tif``, ``folder/known.yaml``; returns (true param, ground truth)."""
    import tifffile

    param, mv = bench_init.movie(case, n, size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "movie.tif", mv.adu_THW.clamp(0, 65535).round().numpy().astype(np.uint16))
    known = {"Camera": {**case[0], "px_size": [case[1], case[1]]},
             "VAR": {"gaussian_psf": {"mode_3d": case[2]["mode_3d"]}}}
    (folder / "known.yaml").write_text(yaml.safe_dump(known, sort_keys=False))
    return param, mv.em


def true_param(case: tuple, estimated: Path, movie_size: int, out: Path) -> Path:
    """``estimated`` with the keys that have a true value set to it; written to ``out``."""
    _, _, psf, phot, av, life, _ = case
    data = yaml.safe_load(estimated.read_text())
    sim = data["Simulation"]
    h, w = sim["img_size"]
    sim["intensity_mu_sig"] = [phot, 0.2 * phot]
    sim["emitter_av"] = av * h * w / movie_size ** 2  # per training frame
    sim["lifetime_avg"] = life
    data["VAR"]["gaussian_psf"].update({k: v for k, v in psf.items() if k != "mode_3d"})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _cli(args: list, cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=str(cwd))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _forget_fits(folder: Path) -> None:
    """``--refit``: the fits of an earlier run are removed, its param and models kept."""
    for path in [folder / "run" / "fit_done.json", *folder.glob("*/emitters*")]:
        path.unlink()


def run_case(name: str, case: tuple, args, folder: Path) -> dict:
    param, gt_all = write_movie(case, args.frames, args.size, args.seed, folder)
    if args.refit:
        _forget_fits(folder)
    tif = folder / "movie.tif"
    row = {"case": name, "seed": args.seed, "frames": args.frames, "size": args.size, "refit": args.refit}
    wall = _cli(["decode_var.run_cli", "--frames", str(tif), "--param", str(folder / "known.yaml"),
                 "--out", str(folder / "run"), "--minutes", str(args.minutes), "--no-progress"], folder)
    run_param = load_param(folder / "run" / "param.yaml")
    photon_min = run_param.HyperParameter.emitter_label_photon_min
    gt = gt_all[gt_all.phot >= photon_min] if photon_min is not None else gt_all
    row["run"] = score(run_param, load_emitters(folder / "run" / "emitters.h5"), gt, args.frames)
    row["run"]["wall_s"] = wall
    print(f"{name}: run   jac {row['run']['jac']:.3f} +- {row['run']['jac_se']:.3f}  rmse {row['run']['rmse_lat']:.1f} "
          f"nm  ({wall / 60:.1f} min)", flush=True)

    tparam = true_param(case, folder / "run" / "param.yaml", args.size, folder / "true" / "param.yaml")
    if not args.refit:
        _cli(["decode_var.train", "-p", str(tparam), "--minutes", str(args.minutes), "-n", "--no-progress"],
             folder / "true")
    exp = sorted((folder / "true" / "out").rglob("model.pt"), key=lambda p: p.stat().st_mtime)[-1].parent
    _cli(["decode_var.fit", "-p", str(exp / "param_run.yaml"), "--model", str(exp), "--frames", str(tif),
          "--out", str(folder / "true" / "emitters.h5"), "--no-progress"], folder / "true")
    row["true"] = score(run_param, load_emitters(folder / "true" / "emitters.h5"), gt, args.frames)
    print(f"{name}: true  jac {row['true']['jac']:.3f} +- {row['true']['jac_se']:.3f}  rmse "
          f"{row['true']['rmse_lat']:.1f} nm", flush=True)

    import tifffile
    frames = tifffile.imread(tif)
    sweep = [(th, score(run_param, classical_fit(frames, param, th), gt, args.frames)) for th in THRESHOLDS]
    th, best = max(sweep, key=lambda s: s[1]["jac"])
    row["classical"] = dict(best, threshold=th)
    print(f"{name}: classical jac {best['jac']:.3f} +- {best['jac_se']:.3f}  rmse {best['rmse_lat']:.1f} nm "
          f"(threshold {th} photons/px)", flush=True)
    return row


def table(rows: list) -> str:
    lines = ["| movie | run: Jaccard | true param: Jaccard | classical: Jaccard | run / true / classical: lateral RMSE "
             "(nm) | run - classical | true - run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        j = {k: f"{r[k]['jac']:.3f} ± {r[k]['jac_se']:.3f}" for k in ("run", "true", "classical")}
        lines.append(f"| {r['case']} | {j['run']} | {j['true']} | {j['classical']} | "
                     f"{r['run']['rmse_lat']:.1f} / {r['true']['rmse_lat']:.1f} / {r['classical']['rmse_lat']:.1f} | "
                     f"{r['run']['jac'] - r['classical']['jac']:+.3f} | {r['true']['jac'] - r['run']['jac']:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget of each model (default 8)")
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 3],
                    help=f"indices into bench_init.CASES: {list(enumerate(bench_init.CASES))}")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="out/bench_run")
    ap.add_argument("--refit", action="store_true", help="reuse the models trained by an earlier run in --out")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    names = list(bench_init.CASES)
    rows = []
    for i in args.cases:
        rows.append(run_case(names[i], bench_init.CASES[names[i]], args, out / f"case{i}"))
        (out / "bench_run.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
