"""Peak memory of ``decode-var-fit`` on long stacks: it must not grow with the number of frames.

For each stack length (``--frames``, default 500 and 2000 frames of ``--size`` 256 px, uint16 ADU), in a
fresh process: ``decode-var-fit --out em.h5`` end to end, as a user runs it (blocks saved to
``<out>.partial/``, the .h5 written, the folder removed, the render written), while a thread samples
``/proc/self/status`` every 20 ms. Reported per length:

- ``VmHWM``: the kernel's high-water mark of the process's resident memory, everything included;
- ``anon``: the highest ``RssAnon`` sampled: what the process allocated (torch, the model, batches,
  localizations), the memory a fit really holds;
- ``file``: the highest ``RssFile`` sampled: file pages mapped into the process (libraries, and the
  frames of a memory-mapped TIFF, which stay resident, though reclaimable, after they are read);
- the same two figures at the end of the fit itself, before the exports and the render;
- frames/s, localizations, and the growth of each figure per 1,000 frames between the shortest and the
  longest stack.

``--cached-maps`` runs the network on the first batch and on the last ``--real-tail`` frames (default 100)
only, and gives the other batches the first batch's maps (the same localizations per frame as a real
fit): what grows with the stack (reading, guards, post-processing, the localizations held, the blocks,
the output and the render) is then measured on 10,000 frames in minutes instead of hours, and the
network's working memory (a batch sized by ``--max-memory``) comes on top of all the localizations held
at the end, as in a real fit.

``--pread`` reads the TIFF with ``os.pread`` instead of its memory map (the change proposed for
``TiffStack.read``), to show what the mapped frames add to ``VmHWM``.

The frames are ``--pool`` distinct frames simulated with the package's simulator at the quickstart density
(6 emitters per 40 x 40 px, 128 px tiles), repeated in order to the stack's length: memory does not
depend on which frame comes next, and a 10,000-frame stack is written in seconds. The model is ``--model
EXP`` (an experiment folder; a trained model finds realistic numbers of emitters) or an untrained
quickstart model.

Run: ``python benchmarks/bench_long_fit.py [--model out/quickstart/<exp>] [--frames 500 2000] [--size 256]
[--threads 2] [--cached-maps [--real-tail 100]] [--pread] [--no-render] [--keep DIR]
[--json benchmarks/results/bench_long_fit.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fit import ensure_model, simulate_stack  # noqa: E402
from decode_var.config.param import load_param  # noqa: E402

_CHILD = r"""
import json, os, threading, time
import numpy as np
import torch
torch.set_num_threads({threads})
import decode_var.fit as F

if {pread!r}:  # the proposed TiffStack.read: contiguous frames with os.pread, nothing left mapped
    from decode_var.data.tiff import TiffStack
    _read = TiffStack.read

    def read(self, start=0, stop=None):
        start, stop, _ = slice(start, stop).indices(len(self))
        if self._offset is None or stop <= start:
            return _read(self, start, stop)
        dtype = self.dtype.newbyteorder(self._tif.byteorder)
        frame = self._shape[1] * self._shape[2] * dtype.itemsize
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (stop - start) * frame, self._offset + start * frame)
        return np.frombuffer(data, dtype).astype(np.float32).reshape((stop - start,) + self._shape[1:])

    TiffStack.read = read

if {cached!r}:  # the network runs on the first batch and the last frames; other batches get the first maps
    from decode_var.inference.predictor import Predictor
    _maps, cache = Predictor.maps, []

    def maps(self, net_NCHW, first_frame=0):
        if first_frame >= {real_from}:  # the network's working memory on top of all localizations held
            return _maps(self, net_NCHW, first_frame)
        if not cache:
            cache.append(_maps(self, net_NCHW, first_frame))
        return cache[0][:net_NCHW.shape[0]].clone()

    Predictor.maps = maps

peak = {{"RssAnon": 0, "RssFile": 0, "VmRSS": 0}}
done = threading.Event()

def status():
    return {{l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.split(":")[0] in
            ("RssAnon", "RssFile", "VmRSS", "VmHWM")}}

def sample():
    while not done.is_set():
        for k, v in status().items():
            if k in peak:
                peak[k] = max(peak[k], v)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
at_fit_end = {{}}
_fit = F.fit

def fit(*a, **k):  # the peaks up to the end of the fit itself (the rest: exports and the render)
    em = _fit(*a, **k)
    at_fit_end.update(seconds=time.perf_counter() - t0, anon=peak["RssAnon"], hwm=status()["VmHWM"])
    return em

F.fit = fit
t0 = time.perf_counter()
rc = F.main(["-p", {param!r}, "--model", {model!r}, "--frames", {frames!r}, "--out", {out!r}, "--no-progress"]
            + (["--no-render"] if {no_render!r} else []))
dt = time.perf_counter() - t0
done.set()
hwm = status()["VmHWM"]
from decode_var.data.emitter_io import load_emitters
assert rc == 0, rc
print(json.dumps({{"seconds": dt, "n_emitters": len(load_emitters({out!r})), "vmhwm_mib": hwm / 1024,
                  "anon_mib": peak["RssAnon"] / 1024, "file_mib": peak["RssFile"] / 1024,
                  "fit_seconds": at_fit_end["seconds"], "fit_vmhwm_mib": at_fit_end["hwm"] / 1024,
                  "fit_anon_mib": at_fit_end["anon"] / 1024}}))
"""


def write_stack(param, size: int, n: int, pool: int, path: Path, seed: int = 0) -> None:
    """``n`` frames: ``pool`` simulated frames repeated in order, written through a memory map in chunks."""
    import tifffile

    first = path.with_name("pool.tif")
    if not first.exists():
        simulate_stack(param, size, pool, first, seed)
    frames = tifffile.imread(first)
    out = tifffile.memmap(path, shape=(n, size, size), dtype=np.uint16, photometric="minisblack")
    for i in range(0, n, pool):
        out[i:i + pool] = frames[:min(pool, n - i)]
    out.flush()
    del out


def run(exp: Path, stack: Path, out: Path, threads: int, pread: bool, cached: bool, no_render: bool,
        real_from: int) -> dict:
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # an earlier, stopped run's blocks
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    code = _CHILD.format(threads=threads, pread=pread, cached=cached, no_render=no_render, real_from=real_from,
                         param=str(exp / "param_run.yaml"),
                         model=str(exp / "model.pt"), frames=str(stack), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode:
        raise SystemExit(f"the fit failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="experiment folder (param_run.yaml, model.pt)")
    ap.add_argument("--frames", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pool", type=int, default=64, help="distinct simulated frames")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pread", action="store_true", help="read the TIFF with pread instead of its memory map")
    ap.add_argument("--cached-maps", action="store_true",
                    help="run the network on the first batch only and reuse its maps: everything that grows with "
                         "the stack (reading, post-processing, blocks, localizations, writing) on 10,000 frames in "
                         "minutes; the network's own memory is bounded by --max-memory and measured without it")
    ap.add_argument("--real-tail", type=int, default=100,
                    help="with --cached-maps, the network runs on this many last frames too (its working memory "
                         "then comes on top of every localization held)")
    ap.add_argument("--no-render", action="store_true", help="decode-var-fit --no-render: the fit and its file only")
    ap.add_argument("--keep", default=None, help="folder for the stacks (kept; default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        exp = ensure_model(args.model, folder / "model")
        param = load_param(exp / "param_run.yaml")
        rows = []
        for n in args.frames:
            stack = folder / f"stack_{n}.tif"
            if not stack.exists():
                write_stack(param, args.size, n, args.pool, stack)
            row = {"frames": n, "stack_mb": stack.stat().st_size / 1e6,
                   **run(exp, stack, folder / f"em_{n}.h5", args.threads, args.pread, args.cached_maps,
                       args.no_render, n - args.real_tail)}
            row["frames_per_s"] = n / row["seconds"]
            rows.append(row)
            print(f"{n:>6} frames ({row['stack_mb']:.0f} MB): VmHWM {row['vmhwm_mib']:.0f} MiB, anon "
                  f"{row['anon_mib']:.0f} MiB, file {row['file_mib']:.0f} MiB (at the end of the fit, before the "
                  f"render: VmHWM {row['fit_vmhwm_mib']:.0f}, anon {row['fit_anon_mib']:.0f} MiB); "
                  f"{row['frames_per_s']:.2f} frames/s, {row['n_emitters']} localizations", flush=True)
    if len(rows) > 1:
        k = 1000 / (rows[-1]["frames"] - rows[0]["frames"])
        growth = {key: (rows[-1][key] - rows[0][key]) * k
                  for key in ("vmhwm_mib", "anon_mib", "file_mib", "fit_vmhwm_mib", "fit_anon_mib")}
        print("growth per 1,000 frames: " + ", ".join(f"{key[:-4]} {v:+.1f} MiB" for key, v in growth.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": args.threads, "pread": args.pread,
                                               "cached_maps": args.cached_maps, "no_render": args.no_render,
                                               "model": args.model or "untrained quickstart", "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
