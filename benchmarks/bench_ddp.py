"""Distributed training throughput: samples/s for 1 and N processes and the scaling efficiency.

Every configuration trains the same model with the real engine (simulation, targets, DDP forward /
backward, optimizer, checkpoint of rank 0) for ``--warmup`` + ``--epochs`` epochs of
``--samples`` samples; the rate comes from the timed epochs of rank 0 (the engine's per-epoch
seconds, without evaluation). Rows:

- ``1 process, single path``: plain ``python -m decode_var.train`` (one seed per batch);
- ``1 process, distributed data path``: the same work per sample as a rank (one seed per sample);
- ``N processes (torchrun)``: DDP, per-rank batch ``--batch``, global batch ``N x --batch``.

Scaling efficiency = rate(N) / (N x rate(1, single path)). On the CPU every process gets
``--threads`` threads, so N processes need N x threads cores for a fair number; on GPUs
(``--device cuda``) N is the number of visible GPUs, one per process.

Run: ``python benchmarks/bench_ddp.py [--device cpu|cuda] [--nproc 2] [--size 40] [--batch 16]``
(prints a Markdown table; ``--json`` writes the rows). Only loopback addresses are used.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _param_dict(args, experiment_out: str) -> dict:
    s = args.size
    return {
        "Hardware": {"device": args.device, "torch_threads": args.threads},
        "HyperParameter": {"epochs": 1000, "pseudo_ds_size": args.samples, "batch_size": args.batch},
        "TestSet": {"test_size": 8},
        "Simulation": {"img_size": [s, s], "psf_extent": [[-0.5, s - 0.5], [-0.5, s - 0.5], None],
                       "emitter_extent": [[-0.5, s - 0.5], [-0.5, s - 0.5], [-750, 750]],
                       "emitter_av": 2.0 * (s / 16) ** 2 / 4},
        "VAR": {"backend": "builtin", "train": {"plot": False, "eval_every": 1000}},
        "InOut": {"experiment_out": experiment_out},
    }


# ---------------------------------------------------------------------- one run (every rank)
def worker(args) -> None:
    import torch
    import yaml

    from decode_var.training import distributed
    from decode_var.training.trainer import Trainer
    from decode_var.config.param import load_param

    ctx, device = None, args.device
    if distributed.launched_distributed():
        ctx, device = distributed.init_from_env(device, 600)
    elif args.per_sample:
        ctx = distributed.DistContext()
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "param.yaml").write_text(yaml.safe_dump(_param_dict(args, str(folder / "out"))))
    param = load_param(folder / "param.yaml")
    trainer = Trainer(param, folder / "exp", device=device, log=False, progress=False, dist=ctx)
    trainer.fit(args.warmup)
    trainer.fit(args.warmup + args.epochs)
    trainer.release_ddp()
    if ctx is None or ctx.is_main:
        seconds = sum(h["seconds"] for h in trainer.history[args.warmup:])
        world = ctx.world_size if ctx is not None else 1
        steps = max(args.samples // (args.batch * world), 1)
        samples = steps * args.batch * world * args.epochs
        (folder / "result.json").write_text(json.dumps({"samples": samples, "seconds": seconds}))
    distributed.shutdown_owned()


# ---------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, nproc: int, per_sample: bool, folder: Path) -> dict:
    common = ["--worker", "--out", str(folder), "--device", args.device, "--size", str(args.size), "--batch",
              str(args.batch), "--samples", str(args.samples), "--threads", str(args.threads), "--warmup",
              str(args.warmup), "--epochs", str(args.epochs)] + (["--per-sample"] if per_sample else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS=str(args.threads))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, *common]
    else:
        cmd = [sys.executable, __file__, *common]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    out = json.loads((folder / "result.json").read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def run(args) -> list[dict]:
    import torch

    nproc = args.nproc or (torch.cuda.device_count() if args.device.startswith("cuda") else 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, n, per_sample in (("1 process, single path", 1, False),
                                     ("1 process, distributed data path", 1, True),
                                     (f"{nproc} processes (torchrun, DDP)", nproc, False)):
            r = _launch(args, n, per_sample, Path(tmp) / f"{n}_{int(per_sample)}")
            rows.append({"config": label, "processes": n, "batch_per_rank": args.batch,
                         "global_batch": args.batch * n, "samples_per_s": r["samples"] / r["seconds"],
                         "timed_samples": r["samples"], "timed_s": r["seconds"], "wall_s": r["wall_s"]})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["efficiency"] = r["samples_per_s"] / (r["processes"] * base)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--nproc", type=int, default=None, help="processes of the distributed run "
                   "(default: 2 on the CPU, every visible GPU with --device cuda)")
    p.add_argument("--size", type=int, default=40, help="frame size in px")
    p.add_argument("--batch", type=int, default=16, help="batch per process (HyperParameter.batch_size)")
    p.add_argument("--samples", type=int, default=128, help="samples per epoch (pseudo_ds_size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--per-sample", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import platform

    import torch

    load_before = os.getloadavg()[0]
    rows = run(args)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"decode-var DDP throughput: {dev}, torch {torch.__version__}, {platform.python_version()}; frames "
          f"{args.size}x{args.size}, batch {args.batch} per process, {args.threads} thread(s) per process, "
          f"{args.epochs} timed epochs of {args.samples} samples; 1-min load average before / after: "
          f"{load_before:.1f} / {os.getloadavg()[0]:.1f}\n")
    print("| configuration | processes | global batch | samples/s | scaling efficiency |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['processes']} | {r['global_batch']} | {r['samples_per_s']:.1f} | "
              f"{r['efficiency']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
