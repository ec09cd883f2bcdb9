"""CUDA checks and speed of decode-var on one GPU, against the same machine's CPU in the same run.

    python benchmarks/bench_gpu.py [--epochs 6] [--out DIR]

Needs a CUDA device (exits with a message otherwise; CI has none). What it does, all seeded:

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

It prints a Markdown table and writes ``bench_gpu.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

QUICKSTART = HERE.parent / "decode_var" / "param" / "var_quickstart.yaml"


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
    n_active = getattr(cpu.loss, "active_scales", None)

    def run(tr, autocast=False):
        tr.model.train()
        tr.model.teacher_forcing = 0.5
        if tr.model.tf_generator is not None:
            tr.model.tf_generator.manual_seed(7)  # the same coins on both devices (drawn on the CPU)
        tr.model.zero_grad(set_to_none=True)
        x, t = frames.to(tr.device), _to_device(tgt, tr.device)
        torch.manual_seed(0)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, out = tr.task.train_forward(x, t, n_active)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("out/bench_gpu"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a machine with a GPU.", file=sys.stderr)
        return 2
    from decode_var.config.param import load_param

    param = load_param(QUICKSTART)
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["agreement"] = agreement(param)
    print(json.dumps(res["agreement"], indent=1), flush=True)
    n_ep = max(args.epochs // 2, 1)
    res["speed_cuda"] = speed(param, "cuda", n_ep)
    torch.set_num_threads(param.Hardware.torch_threads or 2)
    res["speed_cpu"] = speed(param, "cpu", 1)
    res["speed_ratio"] = res["speed_cuda"]["samples_per_s"] / res["speed_cpu"]["samples_per_s"]
    print(json.dumps({k: res[k] for k in ("speed_cuda", "speed_cpu", "speed_ratio")}, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["end_to_end"] = end_to_end(args.epochs, Path(tmp))
    print(json.dumps(res["end_to_end"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
    a, e = res["agreement"], res["end_to_end"]
    print(f"\n| check | value |\n|---|---|\n| GPU | {res['gpu']} (torch {res['torch']}) |\n"
          f"| train output CPU vs CUDA, max abs diff | {a['out_max_abs_diff']:.2e} |\n"
          f"| loss / grad-norm rel. diff CPU vs CUDA | {a['loss_rel_diff']:.1e} / {a['gradnorm_rel_diff']:.1e} |\n"
          f"| bf16 autocast loss finite, rel. diff | {a['loss_bf16_finite']}, {a['loss_bf16_rel_diff']:.1e} |\n"
          f"| train samples/s CUDA / CPU ({param.Hardware.torch_threads} threads) | "
          f"{res['speed_cuda']['samples_per_s']:.0f} / {res['speed_cpu']['samples_per_s']:.0f} "
          f"= {res['speed_ratio']:.1f}x |\n"
          f"| quickstart {args.epochs} epochs on CUDA: non-finite steps, Jaccard, RMSE lat | "
          f"{e['nonfinite_steps']}, {e['jac']:.3f}, {e['rmse_lat']:.1f} nm |\n"
          f"| CUDA checkpoint on CPU vs CUDA, max abs diff | {e['ckpt_cuda_vs_cpu_max_abs_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
