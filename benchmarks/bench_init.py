"""How well ``decode-var-init`` recovers known settings from simulated movies (docs/your_data.md's accuracy table).

    python benchmarks/bench_init.py [--seeds 3] [--frames 200] [--size 64] [--out out/bench_init.json]

Each case is a continuous movie (:func:`decode_var.data.movie.simulate_movie`) with a camera and PSF unlike the
quickstart's, blinking emitters of known flux, density and on-time, on a smooth background (``bg0 + bg1 *
Perlin``, 2 lattice cells) that fades by 30 % over the movie. known.yaml holds the right camera keys and the
PSF kind (no width). Reported per case and seed: the relative error of every estimate against the truth
(emitters per frame against the number drawn), and the seconds the estimate took.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from decode_var.config.param import param_from_dict
from decode_var.data import init_param as ip
from decode_var.data.movie import simulate_movie
from decode_var.data.simulation import Simulator, perlin_NHW

SCMOS = dict(baseline=100.0, e_per_adu=0.46, em_gain=None, qe=0.8, read_sigma=1.6, spur_noise=0.0)
EMCCD = dict(baseline=400.0, e_per_adu=12.0, em_gain=250.0, qe=0.9, read_sigma=60.0, spur_noise=0.002)
ASTIG = dict(foc_shift=300.0, rl_range=350.0, mode_3d=True)
#: name: camera, px (nm), PSF, photons, emitters / frame, on-time (frames), background (bg0, bg1)
CASES = {
    "sCMOS 130 nm 2D": (SCMOS, 130.0, dict(sigma_0=1.3, mode_3d=False), 2500.0, 8.0, 2.0, (60.0, 40.0)),
    "sCMOS 100 nm astig": (SCMOS, 100.0, dict(sigma_0=1.5, **ASTIG), 4000.0, 6.0, 3.0, (100.0, 60.0)),
    "EMCCD 160 nm 2D": (EMCCD, 160.0, dict(sigma_0=1.0, mode_3d=False), 5000.0, 5.0, 1.0, (60.0, 40.0)),
    "EMCCD 160 nm astig": (EMCCD, 160.0, dict(sigma_0=1.2, **ASTIG), 2000.0, 6.0, 1.5, (30.0, 20.0)),
}


def movie(case: tuple, n: int, size: int, seed: int):
    camera, px, psf, phot, av, life, bg = case
    ext = [[-0.5, size - 0.5], [-0.5, size - 0.5]]
    param = param_from_dict({
        "Camera": {**camera, "px_size": [px, px]},
        "Simulation": {"img_size": [size, size], "emitter_extent": ext + [[-750.0, 750.0]], "psf_extent": ext + [None],
                       "intensity_mu_sig": [phot, 0.2 * phot], "emitter_av": av, "lifetime_avg": life},
        "TestSet": {"img_size": [size, size], "frame_extent": ext + [None]}, "VAR": {"gaussian_psf": psf}})
    g = torch.Generator().manual_seed(seed)
    level_HW = bg[0] + bg[1] * perlin_NHW(1, (size, size), 2, g)[0]
    bg_THW = torch.linspace(1.0, 0.7, n)[:, None, None] * level_HW
    return param, simulate_movie(Simulator.parse(param), bg_THW, generator=g)


def errors(param, mv, res) -> dict:
    """Relative error of each estimate (estimate / truth - 1)."""
    k = {path: key.value for path, key in res.keys.items()}
    g, sim, c = param.VAR.gaussian_psf, param.Simulation, param.Camera
    n, H, W = mv.adu_THW.shape
    area = k["Simulation.img_size"][0] * k["Simulation.img_size"][1] / (H * W)  # emitter_av is per training frame
    out = {"photons": k["Simulation.intensity_mu_sig"][0] / sim.intensity_mu_sig[0] - 1,
           "emitters/frame": k["Simulation.emitter_av"] / (len(mv.em) / n * area) - 1,
           "PSF width": k["VAR.gaussian_psf.sigma_0"] / g.sigma_0 - 1,
           "on-time": k["Simulation.lifetime_avg"] / sim.lifetime_avg - 1,
           "background": res.background.simulated_mean / float(mv.bg_THW.mean()) - 1,
           "e-/ADU": (2.0 if c.em_gain else 1.0) / res.transfer.slope / (c.e_per_adu / (c.em_gain or 1.0)) - 1}
    if g.mode_3d:
        out["foc_shift"] = k["VAR.gaussian_psf.foc_shift"] / g.foc_shift - 1
        out["rl_range"] = k["VAR.gaussian_psf.rl_range"] / g.rl_range - 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default="out/bench_init.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, case in CASES.items():
        for seed in range(args.seeds):
            param, mv = movie(case, args.frames, args.size, 100 + seed)
            known = {"Camera": dict(case[0], px_size=[case[1], case[1]]),
                     "VAR": {"gaussian_psf": {"mode_3d": case[2]["mode_3d"]}}}
            t0 = time.perf_counter()
            res = ip.estimate(mv.adu_THW[None], torch.arange(args.frames)[None], args.frames, known)
            rows.append({"case": name, "seed": 100 + seed, "seconds": time.perf_counter() - t0,
                         "errors": errors(param, mv, res), "warnings": res.warnings})
            print(name, seed, " ".join(f"{k} {v:+.1%}" for k, v in rows[-1]["errors"].items()),
                  f"{rows[-1]['seconds']:.1f} s", flush=True)
    print("\n" + table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


def table(rows: list) -> str:
    """Markdown: per case, the largest absolute error of each estimate over the seeds."""
    keys = ["photons", "background", "PSF width", "emitters/frame", "on-time", "e-/ADU"]
    lines = ["| movie | " + " | ".join(keys) + " | s / estimate |", "|---" * (len(keys) + 2) + "|"]
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        worst = [max(abs(r["errors"][k]) for r in mine) for k in keys]
        secs = sum(r["seconds"] for r in mine) / len(mine)
        lines.append(f"| {name} | " + " | ".join(f"{w:.1%}" for w in worst) + f" | {secs:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
