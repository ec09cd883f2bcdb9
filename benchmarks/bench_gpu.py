"""CUDA checks and speed of decode-var on one GPU, against the same machine's CPU in the same run.

    python benchmarks/bench_gpu.py [--time-limit 600] [--stages agreement throughput jaccard fit]
                                   [--batches 16 256 1024] [--jac-batch 256 --jac-lr 2e-3] [--out DIR]

Needs a CUDA device (exits with a message otherwise; CI has none). Every stage checks the time left
of ``--time-limit`` (seconds, the whole script) and is skipped, and said to be, when too little is
left; results are written to ``--out``/bench_gpu.json after every stage. Stages (issue 16):

- ``throughput``: training samples/s of the quickstart model (VARMultiScale + AdaptivePPXYZB, all
  scales active, teacher forcing 0.5) in a plain loop, for each ``--batches`` size: data simulated
  on the GPU (``Hardware.device_simulation: cuda``), data on the CPU (pinned, non-blocking copies),
  data on the CPU made one step ahead by :class:`decode_var.training.prefetch.Prefetcher`, and data on
  the GPU under bf16 autocast; GPU utilisation (mean of ``torch.cuda.utilization()`` or nvidia-smi
  samples every 0.2 s) during each.
- ``jaccard``: ``decode-var-train``'s ``train()`` with the quickstart param on ``cuda``, data on the
  GPU, at ``--jac-batch`` and ``--jac-lr`` (``--jac-ds-size`` samples per epoch, ``--jac-epochs``
  epochs), in a subprocess stopped at its share of the time limit: the training seconds (sum of the
  epochs' ``seconds`` in history.json, test evaluation included) until the test-set Jaccard first
  reaches 0.7, and the Jaccard per epoch. If training with data on the GPU fails, the error is
  recorded and the run repeated with data on the CPU.
- ``fit``: ``benchmarks/bench_fit.py --device cuda --sizes 256``: decode-var-fit frames/s at 256 x 256
  against DECODE's Infer with SigmaMUNet on the same frames and GPU (where DECODE is installed; the
  columns are skipped with a message otherwise).
- ``agreement`` and ``legacy`` (not run by default: ``--stages legacy``), the earlier checks:

1. **Agreement**: the quickstart ``VARMultiScale`` + ``AdaptivePPXYZB`` with identical weights on
   CPU and GPU (TF32 off), one batch with teacher forcing: largest difference of the raw train
   outputs, the loss and the gradient norm (float32 on both).
2. **bf16 autocast**: the same forward + loss under ``torch.autocast('cuda', torch.bfloat16)``:
   the loss must stay finite (the loss computes in float32 inside) and close to the float32 one.
3. **Training**: ``decode-var-train``'s ``train()`` with the quickstart param on ``cuda`` for
   ``--epochs`` epochs, then ``decode-var-eval``'s ``run()`` on ``cuda``; non-finite steps,
   Jaccard and RMSE. The GPU checkpoint is then loaded on the CPU and both predictions of the same
   frames are compared.
4. **Speed**: training samples/s of the same epochs on the GPU and on this machine's CPU
   (``Hardware.torch_threads`` threads), as a ratio. The simulation runs on the CPU on both.

It prints Markdown tables and writes ``bench_gpu.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: the device the new stages measure; ``--smoke`` sets "cpu" to check the script without a GPU
DEV = "cuda"


def sync() -> None:
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()

QUICKSTART = HERE.parent / "decode_var" / "config" / "var_quickstart.yaml"
STAGES = ("agreement", "throughput", "jaccard", "fit", "legacy")


def agreement(param) -> dict:
    """Same weights, same batch, CPU vs CUDA in float32, then CUDA under bf16 autocast."""
    from decode_var.training.trainer import Trainer, _slice, _to_device

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = Trainer(param, None, device="cpu", log=False, progress=False)
    gpu = Trainer(param, None, device="cuda", log=False, progress=False)
    gpu.model.load_state_dict(cpu.model.state_dict())
    _, frames, tgt = cpu.test_set()
    frames, tgt = frames[:16], _slice(tgt, slice(0, 16))

    def run(tr, autocast=False):
        tr.model.train()
        tr.model.teacher_forcing = 0.5
        if tr.model.tf_generator is not None:
            tr.model.tf_generator.manual_seed(7)  # the same coins on both devices (drawn on the CPU)
        tr.model.zero_grad(set_to_none=True)
        x, t = frames.to(tr.device), _to_device(tgt, tr.device)
        torch.manual_seed(0)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, out = tr.task.train_forward(x, t)
        loss = loss.mean()
        loss.backward()
        gnorm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in tr.model.parameters() if p.grad is not None))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return float(loss.detach()), float(gnorm), [o.detach().float().cpu() for o in outs]

    l_c, g_c, o_c = run(cpu)
    l_g, g_g, o_g = run(gpu)
    l_b, g_b, _ = run(gpu, autocast=True)
    return {
        "out_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(o_c, o_g)),
        "loss_cpu": l_c, "loss_cuda": l_g, "loss_rel_diff": abs(l_c - l_g) / abs(l_c),
        "gradnorm_rel_diff": abs(g_c - g_g) / g_c,
        "loss_bf16": l_b, "loss_bf16_finite": math.isfinite(l_b), "gradnorm_bf16_finite": math.isfinite(g_b),
        "loss_bf16_rel_diff": abs(l_b - l_g) / abs(l_g),
    }


def speed(param, device: str, epochs: int) -> dict:
    from decode_var.training.trainer import Trainer

    tr = Trainer(param, None, device=device, log=False, progress=False)
    tr.train_epoch()  # warm-up (cuDNN autotuning, allocator)
    t0 = time.perf_counter()
    for _ in range(epochs):
        tr.train_epoch()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    hp = param.HyperParameter
    n = epochs * max(hp.pseudo_ds_size // hp.batch_size, 1) * hp.batch_size  # the samples train_epoch draws
    return {"device": device, "samples_per_s": n / dt}


def end_to_end(epochs: int, out: Path, device: str = "cuda") -> dict:
    from decode_var.eval_cli import run as run_eval
    from decode_var.inference.predictor import Predictor
    from decode_var.config.param import load_param
    from decode_var.train import train

    trainer = train(QUICKSTART, device=device, no_log=True, progress=False,
                    overrides={"InOut": {"experiment_out": str(out)}, "HyperParameter": {"epochs": epochs}})
    exp = trainer.exp_dir
    metrics = run_eval(exp / "param_run.yaml", exp / "model.pt", exp / "eval", device=device, report=False)
    param = load_param(exp / "param_run.yaml")
    frames = trainer.test_set()[1][:32].cpu()
    p_gpu = Predictor(param, exp / "model.pt", device=device)
    p_cpu = Predictor(param, exp / "model.pt", device="cpu")
    with torch.no_grad():
        a = p_gpu.model(frames.to(device)).float().cpu()
        b = p_cpu.model(frames).float()
    return {"nonfinite_steps": trainer.nonfinite_total, "jac": metrics.get("jac"), "rmse_lat": metrics.get("rmse_lat"),
            "ckpt_cuda_vs_cpu_max_abs_diff": float((a - b).abs().max())}


class Budget:
    """Seconds left of the script's ``--time-limit``."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class UtilSampler:
    """Mean GPU utilisation (%) while the ``with`` block runs, sampled every 0.2 s in a thread.

    ``torch.cuda.utilization()`` (needs pynvml) or ``nvidia-smi``; ``mean`` is None when neither works.
    """

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:  # pynvml missing or NVML refused: ask nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                              "-i", str(torch.cuda.current_device())], capture_output=True, text=True)
        try:
            return float(out.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            v = self.read()
            if v is not None:
                self.samples.append(v)

    def __enter__(self) -> "UtilSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def throughput_one(batch: int, data_device: str, prefetch: bool = False, amp=None, seconds: float = 8.0,
                   lr=None) -> dict:
    """Training samples/s of the quickstart model on the GPU, data made on ``data_device``, for about ``seconds``."""
    from bench_data import quickstart_loop

    from decode_var.training.prefetch import Prefetcher

    make, step = quickstart_loop(batch, DEV, data_device, lr=lr, amp=amp)
    for i in range(3):  # warm-up: cuDNN autotuning, allocator, first simulation
        step(make(i))
    sync()
    t_probe = time.perf_counter()
    step(make(3))
    sync()
    n_steps = int(min(max(5, seconds / max(time.perf_counter() - t_probe, 1e-4)), 2000))
    steps = range(4, 4 + n_steps)
    with UtilSampler() as util:
        t0 = time.perf_counter()
        if prefetch:
            for _, data in Prefetcher(make, steps):
                step(data)
        else:
            for i in steps:
                step(make(i))
        sync()
        dt = time.perf_counter() - t0
    return {"batch": batch, "data": data_device, "prefetch": prefetch, "amp": amp or "fp32", "steps": n_steps,
            "samples_per_s": batch * n_steps / dt, "gpu_util_percent": util.mean}


def throughput(batches, budget: Budget, share: float, lr=None) -> list[dict]:
    """Every batch size x (data on cuda, data on cpu, data on cpu + prefetch, data on cuda + bf16)."""
    configs = [(b, d, p, a) for b in batches for d, p, a in
               ((DEV, False, None), ("cpu", False, None), ("cpu", True, None), (DEV, False, "bf16"))]
    stop_at = budget.left() * (1 - share)
    per = max(3.0, (budget.left() - stop_at) / len(configs) - 4.0)  # 4 s of set-up and warm-up each
    rows = []
    for b, d, p, a in configs:
        if budget.left() < stop_at + per:
            rows.append({"batch": b, "data": d, "prefetch": p, "amp": a or "fp32", "skipped": "time limit"})
            continue
        try:
            rows.append(throughput_one(b, d, p, a, per, lr))
        except Exception as err:  # e.g. out of memory at a large batch: recorded, the others still run
            rows.append({"batch": b, "data": d, "prefetch": p, "amp": a or "fp32",
                         "error": f"{type(err).__name__}: {err}"[:300]})
        if DEV.startswith("cuda"):
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    return rows


_TRAIN = r"""
import sys, torch
sys.path.insert(0, {root!r})
from decode_var.train import train
train({param!r}, device={device!r}, no_log=True, progress=True, overrides={overrides!r})
"""


def _history(out: Path) -> list[dict]:
    files = sorted(out.glob("**/history.json"), key=lambda f: f.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else []


def time_to_jaccard(args, budget: Budget, share: float, data_device: str) -> dict:
    """Train the quickstart on cuda in a subprocess (stopped at its share of the budget): seconds to Jaccard 0.7."""
    out = Path(tempfile.mkdtemp(prefix="bench_gpu_jac_"))
    overrides = {"Hardware": {"device": DEV, "device_simulation": data_device},
                 "HyperParameter": {"batch_size": args.jac_batch, "pseudo_ds_size": args.jac_ds_size,
                                    "epochs": args.jac_epochs, "opt_param": {"lr": args.jac_lr}},
                 "InOut": {"experiment_out": str(out)}, "VAR": {"train": {"plot": False}}}
    if args.smoke:
        overrides["TestSet"] = {"test_size": 16}
    code = _TRAIN.format(root=str(HERE.parent), param=str(QUICKSTART), overrides=overrides, device=DEV)
    limit = max(budget.left() * share, 10.0)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=limit)
        rc, err = proc.returncode, proc.stderr[-1500:]
    except subprocess.TimeoutExpired as exc:
        rc, err = "timeout", (exc.stderr or b"")[-1500:].decode(errors="replace") if exc.stderr else ""
    wall = time.perf_counter() - t0
    hist, seconds, reached = _history(out), 0.0, None
    for e in hist:
        seconds += float(e.get("seconds", 0.0))
        jac = e.get("metrics", {}).get("jac")
        if reached is None and jac is not None and jac >= 0.7:
            reached = {"epoch": e.get("epoch"), "train_seconds": seconds}
    res = {"data": data_device, "batch": args.jac_batch, "lr": args.jac_lr, "ds_size": args.jac_ds_size,
           "epochs_done": len(hist), "returncode": rc, "wall_s": wall, "time_limit_s": limit,
           "jac_per_epoch": [e.get("metrics", {}).get("jac") for e in hist],
           "seconds_per_epoch": [e.get("seconds") for e in hist], "reached_0.7": reached}
    if rc not in (0, "timeout"):
        res["error"] = err
    shutil.rmtree(out, ignore_errors=True)
    return res


def fit_vs_sigmamunet(args, budget: Budget, share: float) -> dict:
    """``bench_fit.py --device cuda --sizes 256`` in a subprocess: its rows (fit, model, DECODE Infer)."""
    js = Path(tempfile.mkdtemp(prefix="bench_gpu_fit_")) / "fit.json"
    cmd = [sys.executable, str(HERE / "bench_fit.py"), "--device", DEV, "--sizes", "64" if args.smoke else "256",
           "--frames", str(args.fit_frames), "--threads", str(args.threads), "--json", str(js)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget.left() * share, 10.0))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "skipped": "time limit"}
    res = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "table": proc.stdout[-3000:],
           "stderr": proc.stderr[-1500:]}
    if js.exists():
        res["rows"] = json.loads(js.read_text())
    return res


def legacy(args, param, res: dict) -> None:
    """The earlier checks: trainer epochs/s on CUDA vs this CPU, and train + eval + checkpoint on CUDA."""
    n_ep = max(args.epochs // 2, 1)
    res["speed_cuda"] = speed(param, "cuda", n_ep)
    torch.set_num_threads(param.Hardware.torch_threads or 2)
    res["speed_cpu"] = speed(param, "cpu", 1)
    res["speed_ratio"] = res["speed_cuda"]["samples_per_s"] / res["speed_cpu"]["samples_per_s"]
    print(json.dumps({k: res[k] for k in ("speed_cuda", "speed_cpu", "speed_ratio")}, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["end_to_end"] = end_to_end(args.epochs, Path(tmp))
    print(json.dumps(res["end_to_end"], indent=1), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Stages: " + ", ".join(STAGES) + " (see the module docstring).")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole script (default 600)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=["agreement", "throughput", "jaccard", "fit"])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 256, 1024], help="throughput batch sizes")
    ap.add_argument("--lr", type=float, default=None, help="throughput: learning rate (default the quickstart's)")
    ap.add_argument("--jac-batch", type=int, default=256, help="jaccard: batch size")
    ap.add_argument("--jac-lr", type=float, default=2e-3, help="jaccard: AdamW learning rate for that batch")
    ap.add_argument("--jac-ds-size", type=int, default=16384, help="jaccard: samples per epoch (pseudo_ds_size)")
    ap.add_argument("--jac-epochs", type=int, default=12, help="jaccard: epochs at most")
    ap.add_argument("--fit-frames", type=int, default=512, help="fit: frames of the 256 x 256 stack")
    ap.add_argument("--threads", type=int, default=8, help="CPU threads (simulation on the CPU, fit's reader)")
    ap.add_argument("--epochs", type=int, default=6, help="legacy: epochs of the end-to-end check")
    ap.add_argument("--out", type=Path, default=Path("out/bench_gpu"))
    ap.add_argument("--smoke", action="store_true",
                    help="check this script without a GPU: the new stages run on the CPU at tiny sizes (the figures "
                         "mean nothing; agreement and legacy need CUDA and are left out)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.stages = [s for s in args.stages if s not in ("agreement", "legacy")]
        args.batches, args.jac_batch, args.jac_ds_size, args.jac_epochs = [2], 4, 8, 1
        args.fit_frames, args.threads = 8, min(args.threads, 2)
    return args


SHARES = {"agreement": 0.05, "throughput": 0.3, "jaccard": 0.6, "fit": 0.95, "legacy": 0.95}


def main(argv=None) -> int:
    global DEV
    args = parse_args(argv)
    DEV = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        print(f"bench_gpu: no CUDA device here ({why}, torch {torch.__version__}); run it on a machine with a GPU.",
              file=sys.stderr)
        return 2
    from decode_var.config.param import load_param

    budget = Budget(args.time_limit)
    torch.set_num_threads(args.threads)
    param = load_param(QUICKSTART)
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "none (--smoke, CPU)",
           "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:  # each stage may use its share of what is left (the last ones all of it)
        if budget.left() < 15:
            res[stage] = {"skipped": "time limit"}
            continue
        t0 = time.perf_counter()
        try:
            res[stage] = run_stage(stage, args, param, budget, res)
        except Exception as err:  # one failing stage must not lose the others' figures
            res[stage] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print(f"[bench_gpu] {stage}: {time.perf_counter() - t0:.0f} s, {budget.left():.0f} s left", flush=True)
        (args.out / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print(summary(res))
    return 0


def run_stage(stage: str, args, param, budget: Budget, res: dict):
    share = SHARES[stage] if stage != args.stages[-1] else 0.95
    if stage == "agreement":
        return agreement(param)
    if stage == "throughput":
        return throughput(args.batches, budget, share, args.lr)
    if stage == "jaccard":
        out = time_to_jaccard(args, budget, share, DEV)
        if out.get("error"):  # data on the GPU failed inside the trainer: the same run with data on the CPU
            out = {"cuda_data": out, "cpu_data": time_to_jaccard(args, budget, share, "cpu")}
        return out
    if stage == "fit":
        return fit_vs_sigmamunet(args, budget, share)
    legacy(args, param, res)
    return {"done": True}


def summary(res: dict) -> str:
    """Markdown tables of what ran."""
    lines = [f"\n## bench_gpu: {res['gpu']} (torch {res['torch']}), `python benchmarks/bench_gpu.py "
             f"{' '.join(res['argv'])}`\n"]
    rows = res.get("throughput")
    if isinstance(rows, list):
        lines += ["| batch | data on | prefetch | precision | samples/s | GPU utilisation |", "|---|---|---|---|---|---|"]
        for r in rows:
            val = f"{r['samples_per_s']:.0f}" if "samples_per_s" in r else r.get("skipped") or r.get("error", "")
            util = r.get("gpu_util_percent")
            lines.append(f"| {r['batch']} | {r['data']} | {r['prefetch']} | {r['amp']} | {val} | "
                         f"{'n/a' if util is None else f'{util:.0f} %'} |")
    jac = res.get("jaccard")
    if isinstance(jac, dict):
        lines.append(f"\njaccard: {json.dumps(jac, default=str)[:1500]}")
    fit = res.get("fit")
    if isinstance(fit, dict) and fit.get("table"):
        lines.append(f"\nfit (`{fit['command']}`):\n{fit['table']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
