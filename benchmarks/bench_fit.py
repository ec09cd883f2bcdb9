"""Fitting speed and peak memory of ``decode-var-fit`` on full-size frames, against the raw model.

For each frame size (``--sizes``, default 64, 256 and 512 px), in one run:

- ``model frames/s``: the network alone (eval-mode forward under ``torch.no_grad`` on windows
  already in memory, network units, the batch size the fit picks): the ceiling of the fit;
- ``fit frames/s``: :func:`decode_var.fit.fit` end to end on a TIFF in ADU (reading, guards, ADU to
  photons, windows, model, post-processing, writing the .h5), timed inside a fresh subprocess
  from the call to ``fit`` to its return (the model is built and loaded inside that time);
- ``overhead``: model frames/s / fit frames/s (1 = the fit costs nothing besides the model);
- where the fit's time goes: waiting for the reading thread, guards and unit conversion, window
  assembly, the model, post-processing (``localize_stack``'s ``timings``), the rest being start-up,
  the model load and writing the file;
- ``peak RSS``: the subprocess's peak resident memory (Linux ``VmHWM``), the whole Python process
  with torch, the model and everything the fit holds;
- with ``--baseline-src DIR`` (a checkout of an earlier decode-var, e.g. ``git worktree add
  /tmp/base <commit>``), the same stack fitted with that code and its own untrained quickstart
  model (or the same ``--model``'s architecture is not that version's), its param hand-edited to
  the frame size (that code cannot fit another size otherwise) and its default batch of 64:
  ``speedup`` is fit frames/s / baseline frames/s, measured in the same run;
- with ``--compile``: the fit's model under ``torch.compile`` (``decode-var-fit --compile``), the
  seconds of its first batch (the compile) and the frames/s after it.

The model is ``--model EXP`` (an experiment folder with ``param_run.yaml`` and ``model.pt``) or,
by default, an untrained VARMultiScale built from the embedded quickstart param (same speed; an
untrained model finds fewer emitters, so post-processing is a little cheaper). The baseline
always uses its own untrained quickstart model. Stacks are
simulated with the package's simulator at the quickstart's density (6 emitters per 40 x 40 px),
seeded.

- against DECODE (where DECODE 0.10 is importable, else skipped with a message; ``--no-decode``
  skips it): DECODE's own fitting pipeline as its Fit notebook sets it up, on the same TIFF and
  device, in a fresh subprocess: ``load_tif``, ``Infer`` with DECODE's frame processing (camera
  ADU -> photons, ``AutoCenterCrop(8)``, ``AmplitudeRescale``), an untrained SigmaMUNet of DECODE's
  reference ``arch_param`` (``param/sigmamunet_decode.yaml``), and the notebook's post-processing
  (``SpatialIntegration``, raw_th 0.1): ``DECODE fit frames/s`` from reading to emitters, and
  ``SigmaMUNet network frames/s``, the same Infer without post-processing on frames in memory.
  ``fit / DECODE fit`` and ``model / SigmaMUNet network`` are ratios of the same run. Infer's batch is
  DECODE's own choice (``--decode-batch auto``: 64 frames on the CPU, its memory probe on a GPU).

Run: ``python benchmarks/bench_fit.py [--model out/quickstart/<exp>] [--sizes 64 256 512]
[--baseline-src /tmp/base] [--compile] [--device cpu] [--no-decode] [--decode-batch auto]
[--json benchmarks/results/bench_fit.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_var.config.param import load_param  # noqa: E402

DEFAULT_FRAMES = {64: 512, 128: 256, 256: 96, 512: 32, 1024: 8}
DENSITY_PER_PX = 6.0 / 1600.0


_BUILD = r"""
import torch
from importlib import resources
from pathlib import Path
try:
    from decode_var.training.checkpoint import save_model
    from decode_var.config.param import load_param, save_param
except ImportError:  # layouts before the subpackages
    from decode_var.checkpoint import save_model
    from decode_var.param import load_param, save_param
from decode_var.registry import build_model
exp = Path({exp!r})
exp.mkdir(parents=True)
pkg = resources.files("decode_var")
qs = pkg.joinpath("config/var_quickstart.yaml")
if not qs.is_file():  # layouts before the config/ subpackage
    qs = pkg.joinpath("param/var_quickstart.yaml")
with resources.as_file(qs) as f:
    param = load_param(f)
torch.manual_seed(0)
save_model(exp / "model.pt", build_model(param))
save_param(exp / "param_run.yaml", param)
"""


def ensure_model(model: str | None, exp: Path, src: Path = ROOT) -> Path:
    """The experiment folder to fit with; without ``model``, an untrained quickstart model built by the
    decode-var at ``src`` (its own architecture and param), in ``exp``."""
    if model:
        return Path(model)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    subprocess.run([sys.executable, "-c", _BUILD.format(exp=str(exp))], check=True, env=env,
                   cwd=tempfile.gettempdir())
    return exp


def simulate_stack(param, size: int, n: int, path: Path, seed: int = 0) -> None:
    """A TIFF of ``n`` frames of ``size`` x ``size`` px in ADU (uint16), simulated at the quickstart density
    (frames above 128 px are 128 px frames tiled: the simulator renders every emitter on the whole frame)."""
    from decode_var.config.param import param_from_dict
    from decode_var.data.simulation import Simulator

    reps = max(1, -(-size // 128))
    tile = -(-size // reps)
    d = param.to_dict()
    ext = [[-0.5, tile - 0.5], [-0.5, tile - 0.5]]
    d["Simulation"].update(img_size=[tile, tile], psf_extent=ext + [None],
                           emitter_extent=ext + [list(d["Simulation"]["emitter_extent"][2])],
                           emitter_av=DENSITY_PER_PX * tile * tile)
    d["Camera"]["convert2photons"] = False  # the simulator then returns ADU
    sim = Simulator.parse(param_from_dict(d))
    frames = []
    for i in range(0, n, 8):
        frames.append(sim.sample(min(8, n - i), seed=seed + i).frames_NCHW[:, sim.frame_window // 2])
    import tifffile

    frames_THW = torch.cat(frames).repeat(1, reps, reps)[:, :size, :size]
    tifffile.imwrite(path, frames_THW.clamp(0, 65535).round().numpy().astype(np.uint16), photometric="minisblack")


def model_speed(exp: Path, size: int, batch: int, n: int, device: str) -> float:
    """Frames/s of the network alone on ``n`` windows of ``size`` px (network units, in memory)."""
    from decode_var.inference.predictor import Predictor

    pred = Predictor(load_param(exp / "param_run.yaml"), exp / "model.pt", device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, pred.channels_in, size, size, generator=g)
    with torch.no_grad():
        pred.model(x[:1].to(pred.device))  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            pred.model(x[:min(batch, n - done)].to(pred.device)).cpu()
            done += batch
    return n / (time.perf_counter() - t0)


_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads({threads})
import decode_var.fit as F
try:  # where fit() looks localize_stack up: inference/stack.py, or fit.py in earlier layouts
    import decode_var.inference.stack as S
except ImportError:
    S = F
timings = {{}}
if "timings" in getattr(getattr(S, "localize_stack", None), "__code__", compile("", "", "exec")).co_varnames:
    # profile the stages (this version has the hook)
    _orig = S.localize_stack
    S.localize_stack = lambda *a, **k: _orig(*a, timings=timings, **k)
t0 = time.perf_counter()
em = F.fit({param!r}, {model!r}, {frames!r}, {out!r}, {batch!r}, device={device!r}, progress=False)
dt = time.perf_counter() - t0
try:  # the high-water mark of this process's own memory (ru_maxrss would include the parent's at fork)
    peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024.0
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({{"seconds": dt, "n_emitters": len(em), "peak_rss_mib": peak, "stages": timings}}))
"""


def run_fit(exp: Path, stack: Path, out: Path, device: str, threads: int, src: Path | None = None,
            param: Path | None = None, batch="auto") -> dict:
    """Fit in a fresh subprocess (``src``: import decode_var from there); seconds, emitters, peak RSS."""
    code = _CHILD.format(threads=threads, param=str(param or exp / "param_run.yaml"), model=str(exp / "model.pt"),
                         frames=str(stack), out=str(out), batch=batch, device=device)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src or ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tempfile.gettempdir())
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fit subprocess failed:\n{stderr.decode()[-2000:]}")
    return json.loads(stdout.decode().strip().splitlines()[-1])


_COMPILED = r"""
import json, sys, time, torch
torch.set_num_threads({threads})
from decode_var.fit import localize_stack, resolve_batch_size
from decode_var.inference.predictor import Predictor
from decode_var.config.param import load_param
from decode_var.data.tiff import TiffStack
stack = TiffStack({frames!r})
pred = Predictor(load_param({param!r}), {model!r}, {device!r})
bs = resolve_batch_size(pred, stack.shape[1:], len(stack))
pred.compile(bs)
t0 = time.perf_counter()
times = []
for em in localize_stack(pred, stack, bs):
    times.append(time.perf_counter())
first = min(bs, len(stack))
print(json.dumps({{"compile_s": times[0] - t0, "steady_fps": (len(stack) - first) / (times[-1] - times[0])}}))
"""


def _child_json(code: str, what: str) -> dict:
    """Run ``code`` in a fresh Python with this checkout importable; its last stdout line, as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr.decode()[-2000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def run_compiled(exp: Path, stack: Path, device: str, threads: int) -> dict:
    """The fit's model under ``torch.compile``: seconds of the first batch (compiling) and frames/s after it."""
    code = _COMPILED.format(threads=threads, param=str(exp / "param_run.yaml"), model=str(exp / "model.pt"),
                            frames=str(stack), device=device)
    return _child_json(code, "compiled fit")


def baseline_param(exp: Path, size: int, tmp: Path) -> Path:
    """The hand edits an earlier version needed to fit ``size`` px frames (the issue's workaround)."""
    import yaml

    d = yaml.safe_load((exp / "param_run.yaml").read_text())
    ext = [[-0.5, size - 0.5], [-0.5, size - 0.5]]
    d["Simulation"]["img_size"] = [size, size]
    d["Simulation"]["psf_extent"] = ext + [None]
    d["Simulation"]["emitter_extent"] = ext + [d["Simulation"]["emitter_extent"][2]]
    d["TestSet"]["img_size"] = [size, size]
    d["TestSet"]["frame_extent"] = ext + [None]
    path = tmp / f"baseline_param_{size}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


SIGMAMUNET_PARAM = ROOT / "param" / "sigmamunet_decode.yaml"

_DECODE_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads({threads})
from decode.neuralfitter.inference.inference import Infer
from decode.neuralfitter.models import SigmaMUNet
from decode.neuralfitter import coord_transform, frame_processing, post_processing, scale_transform
from decode.neuralfitter.utils import processing
from decode.simulation.camera import Photon2Camera
import tifffile
from decode_var.config.param import load_param
def load_tif(path):  # DECODE's frames_io.load_tif, whose tifffile call newer tifffile refuses (multifile=)
    return torch.from_numpy(tifffile.imread(path).astype("float32"))
param = load_param({param!r})
a, c, sc = param.HyperParameter.arch_param, param.Camera, param.Scaling
torch.manual_seed(0)
model = SigmaMUNet(param.HyperParameter.channels_in, depth_shared=a.depth_shared, depth_union=a.depth_union,
                   initial_features=a.initial_features, inter_features=a.inter_features,
                   activation=getattr(torch.nn, a.activation)(), norm=a.norm, norm_groups=a.norm_groups,
                   norm_head=a.norm_head, norm_head_groups=a.norm_head_groups, pool_mode=a.pool_mode,
                   upsample_mode=a.upsample_mode, skip_gn_level=a.skip_gn_level)
def pipeline(post):
    camera = Photon2Camera(qe=c.qe, spur_noise=c.spur_noise, em_gain=c.em_gain, e_per_adu=c.e_per_adu,
                           baseline=c.baseline, read_sigma=c.read_sigma, photon_units=c.convert2photons, device="cpu")
    frame_proc = processing.TransformSequence([processing.wrap_callable(camera.backward),
                                               frame_processing.AutoCenterCrop(8),
                                               scale_transform.AmplitudeRescale(sc.input_scale, sc.input_offset)])
    if not post:
        return Infer(model=model, ch_in=param.HyperParameter.channels_in, frame_proc=frame_proc, post_proc=None,
                     device={device!r}, batch_size={batch!r}, forward_cat="frames")
    size = frame_processing.get_frame_extent(frames.unsqueeze(1).size(), frame_proc.forward)
    ext = ((-0.5, size[-2] - 0.5), (-0.5, size[-1] - 0.5))
    post_proc = processing.TransformSequence([
        scale_transform.InverseParamListRescale(sc.phot_max, sc.z_max, sc.bg_max),
        coord_transform.Offset2Coordinate(xextent=ext[0], yextent=ext[1], img_shape=size[-2:]),
        post_processing.SpatialIntegration(raw_th=0.1, xy_unit="px", px_size=c.px_size)])
    return Infer(model=model, ch_in=param.HyperParameter.channels_in, frame_proc=frame_proc, post_proc=post_proc,
                 device={device!r}, batch_size={batch!r})
frames = load_tif({frames!r})
pipeline(False).forward(frames[:2])  # warm-up
t0 = time.perf_counter()
frames = load_tif({frames!r})
em = pipeline(True).forward(frames)
t_fit = time.perf_counter() - t0
t0 = time.perf_counter()
pipeline(False).forward(frames)
t_net = time.perf_counter() - t0
try:
    peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024.0
except (OSError, IndexError):
    peak = float("nan")
print(json.dumps({{"seconds_fit": t_fit, "seconds_network": t_net, "n_emitters": len(em), "peak_rss_mib": peak}}))
"""


def decode_infer_speed(stack: Path, device: str, threads: int, batch) -> dict | None:
    """DECODE's own fitting pipeline (its Fit notebook) on the stack, in a fresh subprocess; None without DECODE.

    ``load_tif``, then ``Infer`` with the frame processing of DECODE's notebook (``camera.backward``,
    ``AutoCenterCrop(8)``, ``AmplitudeRescale``) and an untrained SigmaMUNet of DECODE's reference
    ``arch_param`` (``param/sigmamunet_decode.yaml``), with the notebook's post-processing
    (``InverseParamListRescale``, ``Offset2Coordinate``, ``SpatialIntegration(raw_th=0.1)``):
    ``seconds_fit``, from reading to emitters. ``seconds_network``: the same ``Infer`` without
    post-processing on the frames in memory. ``batch``: Infer's batch size ('auto' = DECODE's choice: its
    memory probe on a GPU, 64 frames on the CPU).
    """
    from decode_var.backend import decode_status

    ok, found = decode_status()
    if not ok:
        print(f"bench_fit: DECODE is not usable here ({found}); the SigmaMUNet (DECODE Infer) columns are "
              "skipped. Run this script with a Python that has DECODE 0.10.", file=sys.stderr)
        return None
    code = _DECODE_CHILD.format(threads=threads, param=str(SIGMAMUNET_PARAM), frames=str(stack), device=device,
                                batch=batch)
    return _child_json(code, "DECODE Infer subprocess")


CLASSICAL_DENSITIES = (1.0, 6.0, 15.0)  # emitters per 40 x 40 px area
CLASSICAL_FRAMES = {64: 400, 256: 40, 512: 10}


def movie_param(param, size: int):
    """The model's param with the frame size set to ``size`` px (the simulation of the test movies)."""
    from decode_var.config.param import param_from_dict

    d = param.to_dict()
    ext = [[-0.5, size - 0.5], [-0.5, size - 0.5]]
    d["Simulation"].update(img_size=[size, size], psf_extent=ext + [None],
                           emitter_extent=ext + [list(d["Simulation"]["emitter_extent"][2])])
    return param_from_dict(d)


def decode_var_fit_timed(param, exp: Path, tif: Path, sparse: bool) -> tuple:
    """(emitters, seconds): the fit as ``decode-var-fit`` runs it, in this process, from building the
    predictor (the model load) to the last localization; the file is not written."""
    from decode_var.core.emitters import EmitterSet
    from decode_var.data.tiff import open_stack
    from decode_var.inference.predictor import Predictor
    from decode_var.inference.stack import localize_stack, resolve_batch_size

    t0 = time.perf_counter()
    pred = Predictor(param, exp / "model.pt", sparse=sparse)
    stack = open_stack(tif)
    em = EmitterSet.cat(list(localize_stack(pred, stack, resolve_batch_size(pred, stack.shape[1:], len(stack)))))
    return em, time.perf_counter() - t0


def versus_classical(exp: Path, sizes, densities, tmp: Path, frames=None, json_path=None) -> list[dict]:
    """decode-var (sparse and dense) against the classical fitter of ``bench_movie.py`` (threshold tuned on
    its tuning movie) on the same simulated movies with ground truth, each timed end to end in this process:
    frames/s and Jaccard of each, and decode-var's frames/s as a ratio to the classical fitter's."""
    import tifffile
    from bench_movie import classical_fit, score, simulate_movie, tune_threshold

    param = load_param(exp / "param_run.yaml")
    threshold, _ = tune_threshold(param, 200)
    rows = []
    for i, size in enumerate(sizes):
        n = frames[i] if frames else CLASSICAL_FRAMES.get(size, 20)
        mparam = movie_param(param, size)
        for density in densities:
            adu_FHW, gt = simulate_movie(mparam, n, density * size * size / 1600.0, "per_frame", seed=size + int(density))
            tif = tmp / f"movie_{size}_{density:g}.tif"
            tifffile.imwrite(tif, adu_FHW, photometric="minisblack")
            row = {"size": size, "density_per_40x40": density, "frames": n, "n_gt": len(gt)}
            for name, sparse in (("sparse", True), ("dense", False)):
                em, sec = decode_var_fit_timed(param, exp, tif, sparse)
                row[name] = {"fps": n / sec, **score(mparam, em, gt, n)}
            t0 = time.perf_counter()
            em = classical_fit(tifffile.imread(tif), mparam, threshold)
            row["classical"] = {"fps": n / (time.perf_counter() - t0), **score(mparam, em, gt, n)}
            row["sparse_vs_classical"] = row["sparse"]["fps"] / row["classical"]["fps"]
            row["dense_vs_classical"] = row["dense"]["fps"] / row["classical"]["fps"]
            rows.append(row)
            print(f"{size} px, {density:g} per 40x40: sparse {row['sparse']['fps']:.2f} f/s jac "
                  f"{row['sparse']['jac']:.3f} | dense {row['dense']['fps']:.2f} f/s jac {row['dense']['jac']:.3f} | "
                  f"classical {row['classical']['fps']:.2f} f/s jac {row['classical']['jac']:.3f} | "
                  f"ratio sparse / classical {row['sparse_vs_classical']:.2f}x", flush=True)
            tif.unlink()
            if json_path:  # row by row: a run that dies (memory) keeps what it measured
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(json_path).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    return rows


def _print_classical(rows, args) -> None:
    print(f"\n`python benchmarks/bench_fit.py {' '.join(sys.argv[1:])}`  ({args.threads} threads)\n")
    print("| frame | emitters per 40 x 40 px | frames | decode-var frames/s (default / --sparse) | classical frames/s | "
          "decode-var / classical | Jaccard decode-var (both paths) / classical | lateral RMSE decode-var / classical (nm) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, d, c = r["sparse"], r["dense"], r["classical"]
        print(f"| {r['size']}x{r['size']} | {r['density_per_40x40']:g} | {r['frames']} | {d['fps']:.2f} / {s['fps']:.2f} | "
              f"{c['fps']:.2f} | **{r['dense_vs_classical']:.2f}x** | {d['jac']:.3f} / {c['jac']:.3f} | "
              f"{d['rmse_lat']:.1f} / {c['rmse_lat']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="experiment folder (default: untrained quickstart model)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frames per size (default by size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-src", default=None, help="checkout of an earlier decode-var to compare with")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fit with --compile: first batch (compiling) and frames/s after it")
    ap.add_argument("--no-decode", action="store_true", help="skip DECODE's Infer with SigmaMUNet")
    ap.add_argument("--decode-batch", default="auto",
                    help="batch size of DECODE's Infer ('auto': DECODE's own choice, 64 frames on the CPU)")
    ap.add_argument("--classical", action="store_true",
                    help="instead: decode-var (sparse and dense) against the classical fitter on movies with ground "
                         "truth, at --densities emitters per 40 x 40 px (needs a trained --model)")
    ap.add_argument("--densities", type=float, nargs="+", default=list(CLASSICAL_DENSITIES))
    args = ap.parse_args(argv)
    if args.classical:
        if args.model is None:
            ap.error("--classical needs a trained --model (an untrained one finds nothing)")
        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        with tempfile.TemporaryDirectory() as d:
            rows = versus_classical(Path(args.model), args.sizes, args.densities, Path(d), args.frames, args.json)
        _print_classical(rows, args)
        return 0
    if args.decode_batch != "auto":
        args.decode_batch = int(args.decode_batch)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exp = ensure_model(args.model, tmp / "model")
        base_exp = ensure_model(None, tmp / "base_model", Path(args.baseline_src)) if args.baseline_src else None
        param = load_param(exp / "param_run.yaml")
        for i, size in enumerate(args.sizes):
            n = args.frames[i] if args.frames else DEFAULT_FRAMES.get(size, 16)
            stack = tmp / f"stack_{size}.tif"
            simulate_stack(param, size, n, stack, seed=size)
            fit_row = run_fit(exp, stack, tmp / f"fit_{size}.h5", args.device, args.threads)
            from decode_var.fit import resolve_batch_size
            from decode_var.inference.predictor import Predictor

            batch = resolve_batch_size(Predictor(param, exp / "model.pt", args.device), (size, size), n)
            model_fps = model_speed(exp, size, batch, n, args.device)
            row = {"size": size, "frames": n, "batch": batch, "model_fps": model_fps,
                   "fit_fps": n / fit_row["seconds"], "overhead": model_fps / (n / fit_row["seconds"]),
                   "peak_rss_mib": fit_row["peak_rss_mib"], "n_emitters": fit_row["n_emitters"],
                   "stages_s": fit_row.get("stages", {})}
            if args.baseline_src:
                base = run_fit(base_exp, stack, tmp / f"base_{size}.h5", args.device, args.threads,
                               src=Path(args.baseline_src), param=baseline_param(base_exp, size, tmp), batch=64)
                row.update(baseline_fps=n / base["seconds"], speedup=row["fit_fps"] * base["seconds"] / n,
                           baseline_peak_rss_mib=base["peak_rss_mib"], baseline_n_emitters=base["n_emitters"])
            if args.compile:
                comp = run_compiled(exp, stack, args.device, args.threads)
                row.update(compile_s=comp["compile_s"], compiled_fps=comp["steady_fps"])
            if not args.no_decode:
                dec = decode_infer_speed(stack, args.device, args.threads, args.decode_batch)
                if dec is not None:
                    row.update(decode_fit_fps=n / dec["seconds_fit"], decode_net_fps=n / dec["seconds_network"],
                               decode_n_emitters=dec["n_emitters"], decode_peak_rss_mib=dec["peak_rss_mib"],
                               fit_vs_decode=row["fit_fps"] * dec["seconds_fit"] / n,
                               model_vs_decode=row["model_fps"] * dec["seconds_network"] / n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print_table(rows, args)
    _print_stages(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _print_stages(rows) -> None:
    rows = [r for r in rows if r.get("stages_s")]
    if not rows:
        return
    names = ["wait_read", "convert", "windows", "model", "post"]
    print("\nWhere a fit's time goes (share of the fit's wall time; the rest is start-up, the model load and "
          "writing the file):\n")
    print("| frame | " + " | ".join(names) + " | rest |")
    print("|---|" + "---|" * (len(names) + 1))
    for r in rows:
        total = r["frames"] / r["fit_fps"]
        shares = [r["stages_s"].get(k, 0.0) / total for k in names]
        print(f"| {r['size']}x{r['size']} | " + " | ".join(f"{100 * v:.1f} %" for v in shares) +
              f" | {100 * (1 - sum(shares)):.1f} % |")


def _print_table(rows, args) -> None:
    print(f"\n`python benchmarks/bench_fit.py {' '.join(sys.argv[1:])}`  (device {args.device}, "
          f"{args.threads} threads)\n")
    head = "| frame | frames | batch | model frames/s | fit frames/s | model / fit | peak RSS |"
    sep = "|---|---|---|---|---|---|---|"
    if any("baseline_fps" in r for r in rows):
        head += " before frames/s | speedup | before peak RSS |"
        sep += "---|---|---|"
    if any("compiled_fps" in r for r in rows):
        head += " --compile frames/s (after a compile of) |"
        sep += "---|"
    if any("decode_fit_fps" in r for r in rows):
        head += (" SigmaMUNet (DECODE Infer) network frames/s | DECODE fit frames/s | fit / DECODE fit | "
                 "model / SigmaMUNet network |")
        sep += "---|---|---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['size']}x{r['size']} | {r['frames']} | {r['batch']} | {r['model_fps']:.1f} | "
                f"{r['fit_fps']:.1f} | {r['overhead']:.2f} | {r['peak_rss_mib']:.0f} MiB |")
        if "baseline_fps" in r:
            line += f" {r['baseline_fps']:.1f} | {r['speedup']:.2f}x | {r['baseline_peak_rss_mib']:.0f} MiB |"
        if "compiled_fps" in r:
            line += f" {r['compiled_fps']:.1f} ({r['compile_s']:.0f} s) |"
        if "decode_fit_fps" in r:
            line += (f" {r['decode_net_fps']:.2f} | {r['decode_fit_fps']:.2f} | {r['fit_vs_decode']:.2f}x | "
                     f"{r['model_vs_decode']:.2f}x |")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
