"""Data-path throughput: simulate a batch, then targets and weights at every scale.

    python benchmarks/bench_data.py [--sizes 40 128] [--batch 16] [--repeats 5]
    python benchmarks/bench_data.py --prefetch [--steps 12] [--batch 16] [--repeats 3] [--depth 1]
                                    [--prefetch-threads default 1]

Reports samples/s of the whole data path (3-frame windows, 4 scales 0.25 / 0.5 / 1 / 2) for each
backend that is available, and, in the same run, samples/s of a VARMultiScale training step
(forward + backward, same batch) so that the data path's share of a step is a ratio measured on
the same machine at the same time. Target: data path < 20% of a training step.

``--prefetch``: training steps of the quickstart configuration (simulation + targets + weights,
then forward, loss, backward, AdamW step of VARMultiScale + AdaptivePPXYZB with all scales active)
in a plain loop, making each batch before its step, and with
:class:`decode_var.training.prefetch.Prefetcher` making the next batch in a thread during the step
(one row per ``--prefetch-threads`` value: the torch threads of that thread). The loops alternate
``--repeats`` times in the same run; the table gives samples/s, the median of the per-repeat
ratios (prefetch / plain), and the data path's and the step's own times, whose sum and maximum
bound what overlapping can give.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from decode_var.backend import decode_available, get_backend
from decode_var.config.param import param_from_dict
from decode_var.data.targets import MultiScaleTargets

QUICKSTART = Path(__file__).resolve().parents[1] / "decode_var" / "config" / "var_quickstart.yaml"
SCALES = [0.25, 0.5, 1.0, 2.0]


def make_param(size: int):
    ext = [-0.5, size - 0.5]
    return param_from_dict({
        "Simulation": {"img_size": [size, size], "psf_extent": [ext, ext, None],
                       "emitter_extent": [ext, ext, [-750.0, 750.0]],
                       "emitter_av": 6.0 * (size / 40) ** 2},
        "VAR": {"scales": SCALES, "backend": "builtin"}})


def time_data(param, backend_name: str, batch: int, repeats: int) -> float:
    backend = get_backend(backend_name)
    sim = backend.simulator(param)
    targets = MultiScaleTargets.parse(param, backend)
    sim.sample(batch, 0)  # warm-up
    t0 = time.perf_counter()
    for i in range(repeats):
        b = sim.sample(batch, seed=i + 1)
        targets(b.em, b.bg_NHW, batch)
    return batch * repeats / (time.perf_counter() - t0)


def time_train_step(param, batch: int, repeats: int) -> float:
    from decode_var.registry import build_loss, build_model

    backend = get_backend("builtin")
    model, loss = build_model(param), build_loss(param)
    loss.set_epoch(10 ** 6)  # all scales active
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = backend.simulator(param).sample(batch, 0)
    tg, wg = MultiScaleTargets.parse(param, backend)(b.em, b.bg_NHW, batch)
    x = (b.frames_NCHW - param.Scaling.input_offset) / param.Scaling.input_scale

    def step():
        opt.zero_grad()
        loss(model(x, targets=tg, n_active=len(tg)), tg, wg).mean().backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - t0)


def run(sizes=(40, 128), batch: int = 16, repeats: int = 5) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    backends = ["builtin"] + (["decode"] if decode_available() else [])
    for size in sizes:
        param = make_param(size)
        train_sps = time_train_step(param, batch, max(2, repeats // 2))
        for name in backends:
            sps = time_data(param, name, batch, repeats)
            rows.append({"frame": f"{size}x{size}", "backend": name, "data_samples_per_s": sps,
                         "train_samples_per_s": train_sps, "data_share_of_step": train_sps / sps})
    return rows


def markdown(rows) -> str:
    out = ["| frame | backend | data path samples/s | training step samples/s (VARMultiScale) | data / step time |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['frame']} | {r['backend']} | {r['data_samples_per_s']:.0f} | "
                   f"{r['train_samples_per_s']:.1f} | {100 * r['data_share_of_step']:.1f}% |")
    return "\n".join(out)


def quickstart_loop(batch: int, device: str = "cpu", data_device: str = "cpu", lr=None, amp=None):
    """(make, step) of the quickstart configuration.

    ``make(i)`` -> (frames, targets, weights) of step i (seeded by i, network units), simulated on
    ``data_device`` and moved to ``device`` (pinned, non-blocking, when they come from the CPU to a GPU);
    ``step(data)`` -> one AdamW step on ``device`` (learning rate ``lr``, default the quickstart's; ``amp``:
    'bf16' runs forward and loss under autocast).
    """
    from decode_var.config.param import load_param
    from decode_var.data.simulation import FrameScale
    from decode_var.registry import build_loss, build_model

    param = load_param(QUICKSTART)
    param.Hardware.device_simulation = data_device
    backend = get_backend("builtin")
    sim, targets, scale = backend.simulator(param), MultiScaleTargets.parse(param, backend), FrameScale.parse(param)
    torch.manual_seed(0)
    model, loss = build_model(param).to(device), build_loss(param)
    loss.set_epoch(param.HyperParameter.epochs // 2)  # mid-run: warm-up over, all scales active
    n_active = getattr(loss, "active_scales", len(SCALES))
    if hasattr(model, "teacher_forcing"):
        model.teacher_forcing = 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=lr or param.HyperParameter.opt_param.lr)
    pin = torch.device(device).type == "cuda" and torch.device(sim.device).type == "cpu"

    def move(t):
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    def make(i: int):
        b = sim.sample(batch, seed=10_000 + i)
        tg, wg = targets(b.em, b.bg_NHW, batch)
        return move(scale(b.frames_NCHW)), [move(t) for t in tg], [move(w) for w in wg]

    def step(data):
        x, tg, wg = data
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x, targets=tg[:n_active], n_active=n_active)
            value = loss(out, tg, wg).mean()
        value.backward()
        opt.step()

    return make, step


def time_prefetch(batch: int = 16, steps: int = 12, repeats: int = 3, depth: int = 1,
                  prefetch_threads=(None, 1)) -> list[dict]:
    """Quickstart training samples/s of a plain loop and of Prefetcher loops, interleaved in the same run.

    One row per entry of ``prefetch_threads`` (torch threads of the Prefetcher's thread; None = torch's
    default for a new thread); every repeat times the plain loop and then each Prefetcher loop, each on
    new steps, and a row's ratio is the median over repeats of plain time / prefetch time.
    """
    from decode_var.training.prefetch import Prefetcher

    make, step = quickstart_loop(batch)

    def plain(start, _):
        for i in range(start, start + steps):
            step(make(i))

    def prefetched(start, threads):
        for _, data in Prefetcher(make, range(start, start + steps), depth=depth, threads=threads):
            step(data)

    def timed(fn, *a):
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    arms = [(plain, None)] + [(prefetched, t) for t in prefetch_threads]
    for k, (fn, t) in enumerate(arms):  # warm-up
        fn(k * steps, t)
    times = [[] for _ in arms]
    start = len(arms) * steps
    for _ in range(repeats):
        for k, (fn, t) in enumerate(arms):
            times[k].append(timed(fn, start, t))
            start += steps
    data = [make(i) for i in range(3)]
    t_data = statistics.median(timed(make, i) for i in range(3, 3 + steps))
    t_step = statistics.median(timed(step, data[i % 3]) for i in range(steps))
    n = batch * steps
    return [{"batch": batch, "steps": steps, "repeats": repeats, "depth": depth, "threads": torch.get_num_threads(),
             "prefetch_threads": t or "default", "plain_samples_per_s": n / statistics.median(times[0]),
             "prefetch_samples_per_s": n / statistics.median(times[k + 1]),
             "ratios": [a / b for a, b in zip(times[0], times[k + 1])],
             "ratio": statistics.median(a / b for a, b in zip(times[0], times[k + 1])),
             "data_s_per_step": t_data, "step_s_per_step": t_step,
             "ideal_ratio": (t_data + t_step) / max(t_data, t_step)} for k, t in enumerate(prefetch_threads)]


def markdown_prefetch(rows: list[dict]) -> str:
    out = ["| batch | torch threads: step / prefetch thread | plain loop samples/s | with Prefetcher samples/s | "
           f"prefetch / plain (median of {rows[0]['repeats']}) | data / step alone (s) | ideal ratio |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['batch']} | {r['threads']} / {r['prefetch_threads']} | {r['plain_samples_per_s']:.1f} | "
                   f"{r['prefetch_samples_per_s']:.1f} | {r['ratio']:.2f}x "
                   f"({', '.join(f'{v:.2f}' for v in r['ratios'])}) | {r['data_s_per_step']:.3f} / "
                   f"{r['step_s_per_step']:.3f} | {r['ideal_ratio']:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefetch", action="store_true",
                    help="quickstart training steps with and without the Prefetcher (see above)")
    ap.add_argument("--steps", type=int, default=12, help="--prefetch: steps per timed loop")
    ap.add_argument("--depth", type=int, default=1, choices=[1, 2], help="--prefetch: batches made ahead")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--prefetch-threads", nargs="+", default=["default", "1"],
                    help="--prefetch: torch threads of the Prefetcher's thread, one row each ('default': torch's "
                         "default for a new thread)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prefetch:
        pt = [None if v == "default" else int(v) for v in args.prefetch_threads]
        res = time_prefetch(args.batch, args.steps, args.repeats, args.depth, pt)
        print(f"`python benchmarks/bench_data.py {' '.join(sys.argv[1:])}`\n")
        print(markdown_prefetch(res))
    else:
        print(markdown(run(args.sizes, args.batch, args.repeats)))
