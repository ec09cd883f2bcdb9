"""Data-path throughput: simulate a batch, then targets and weights at every scale.

    python benchmarks/bench_data.py [--sizes 40 128] [--batch 16] [--repeats 5]

Reports samples/s of the whole data path (3-frame windows, 4 scales 0.25 / 0.5 / 1 / 2) for each
backend that is available, and, in the same run, samples/s of a VARMultiScale training step
(forward + backward, same batch) so that the data path's share of a step is a ratio measured on
the same machine at the same time. Target: data path < 20% of a training step.
"""
from __future__ import annotations

import argparse
import time

import torch

from decode_var.backend import decode_available, get_backend
from decode_var.config.param import param_from_dict
from decode_var.data.targets import MultiScaleTargets

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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 128])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(markdown(run(args.sizes, args.batch, args.repeats)))
