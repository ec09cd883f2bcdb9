"""Stability of three 6-channel losses under adversarial training: non-finite losses and gradients.

A small conv net (3 conv layers, 16 channels) is trained for ``--steps`` steps on 16 x 16 frames,
batch 8, with each loss in turn. Every loss sees the same seeded stream of batches, and the net
starts from the same seeded weights. The batches cycle through four scenarios, each once with and
once without float16 autocast (8-step cycle):

- ``normal``: 0-5 emitters per frame, 1e3-1e4 photons, background 10-200 photons/px;
- ``bright``: extreme intensities, 1e4-1e6 photons and background up to 1e4 photons/px
  (normalised photon targets up to 100);
- ``empty``: no emitter at all (all detection targets 0);
- ``crowded``: an emitter in 60-100 % of the pixels.

A step whose loss is non-finite, or whose gradients are, is skipped (as the engine does) and
counted; otherwise the gradient norm is clipped to 1 and Adam (lr 1e-3) steps. The losses:

- ``custom count (baseline)``: our reimplementation of the original emitter project's loss:
  a Gaussian count term with the Bernoulli variance ``sum p(1-p) + 1e-6``, detection BCE as
  sigmoid-then-log, and the localisation error as an unprotected Euclidean distance
  ``sqrt(dx^2 + dy^2 + dz^2)`` at emitter pixels, plus squared errors for photons and background;
- ``DECODE PPXYZBLoss``: DECODE 0.10's loss (``n/a`` when DECODE is not importable);
- ``AdaptivePPXYZB``: this package's loss (recommended weights, pos_weight 2).

Run: ``python benchmarks/bench_stability.py [--steps 2000] [--seed 0]`` (prints a Markdown table).
``run(steps)`` returns the rows for ``benchmarks/run_all.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from decode_var.nn.loss import AdaptivePPXYZBLoss  # noqa: E402

FRAME = 16
BATCH = 8
PHOT_MAX = 1e4  # normalisation of the photon channel (as Scaling.phot_max)
BG_MAX = 1e2  # normalisation of the background channel (as Scaling.bg_max)
INPUT_SCALE = 1e3  # frames are divided by this before the net (as DECODE's input rescaling)
SCENARIOS = ("normal", "bright", "empty", "crowded")


# ---------------------------------------------------------------------- data
def _psf_kernel() -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 0.8 ** 2))
    return (g / g.sum()).view(1, 1, 5, 5)


def make_batch(step: int, gen: torch.Generator, kernel: torch.Tensor):
    """One batch of the scenario of ``step``: frames (N,1,H,W), target (N,6,H,W), weight (N,6,H,W)."""
    scenario = SCENARIOS[step % len(SCENARIOS)]
    n, s = BATCH, FRAME
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    if scenario == "empty":
        density = torch.zeros(n, 1, 1)
    elif scenario == "crowded":
        density = 0.6 + 0.4 * u(n, 1, 1)
    else:
        density = u(n, 1, 1) * 5 / (s * s)
    p = (u(n, s, s) < density).float()
    if scenario == "bright":
        phot = 10 ** (4 + 2 * u(n, s, s))
        bg = 10 ** (2 + 2 * u(n, 1, 1)).expand(n, s, s)
    else:
        phot = 10 ** (3 + u(n, s, s))
        bg = (10 + 190 * u(n, 1, 1)).expand(n, s, s)
    phot = phot * p
    xy = (u(n, 2, s, s) - 0.5) * p.unsqueeze(1)
    z = (u(n, s, s) * 2 - 1) * p
    # sub-pixel shifts are ignored in the image: the stability question does not depend on them
    signal = F.conv2d(phot.unsqueeze(1), kernel, padding=2)
    mean = signal + bg.unsqueeze(1)
    frames = mean + mean.clamp(min=0).sqrt() * torch.randn(mean.shape, generator=gen)
    target = torch.stack((p, phot / PHOT_MAX, xy[:, 0], xy[:, 1], z, bg / BG_MAX), 1)
    weight = torch.ones_like(target)
    weight[:, 1:5] = p.unsqueeze(1)  # SimpleWeight, ROI of one pixel
    return scenario, frames, target, weight


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 6, 1)

    def forward(self, frames_N1HW):
        x = F.relu(self.conv1(frames_N1HW / INPUT_SCALE))
        x = F.relu(self.conv2(x))
        return self.head(x)


# ---------------------------------------------------------------------- the losses
def custom_count_loss(output, target, weight):
    """Reimplementation of the original emitter project's loss (the baseline), per batch element."""
    p = torch.sigmoid(output[:, 0])
    tp = target[:, 0]
    n_true = tp.sum((-1, -2))
    mean = p.sum((-1, -2))
    var = (p * (1 - p)).sum((-1, -2)) + 1e-6  # Bernoulli variance, eps 1e-6
    count = 0.5 * (n_true - mean) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)
    bce = -(tp * torch.log(p) + (1 - tp) * torch.log(1 - p)).mean((-1, -2))  # sigmoid-then-log
    d = output[:, 2:5] - target[:, 2:5]
    dist = torch.sqrt((d ** 2).sum(1))  # unprotected distance
    mask = weight[:, 2]
    loc = (dist * mask).mean((-1, -2))
    mse = ((output[:, [1, 5]] - target[:, [1, 5]]) ** 2 * weight[:, [1, 5]]).mean((1, 2, 3))
    return count + bce + loc + mse


def _losses():
    """name -> callable(output, target, weight) giving a tensor whose mean is the loss, or None if n/a."""
    out = {"custom count (baseline)": custom_count_loss}
    try:
        from decode.neuralfitter.loss import PPXYZBLoss as DecodePPXYZB
        out["DECODE PPXYZBLoss"] = DecodePPXYZB(device="cpu")
    except Exception:  # DECODE absent or broken: reported as n/a
        out["DECODE PPXYZBLoss"] = None
    out["AdaptivePPXYZB (this)"] = AdaptivePPXYZBLoss()
    return out


# ---------------------------------------------------------------------- the run
def _train(criterion, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    kernel = _psf_kernel()
    bad_loss = bad_grad = bad_out = 0
    where: dict[str, int] = {}
    finite_losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        scenario, frames, target, weight = make_batch(step, gen, kernel)
        half = (step // len(SCENARIOS)) % 2 == 1
        tag = scenario + ("+fp16" if half else "")
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            output = net(frames)
            loss = criterion(output, target, weight).mean()
        if not torch.isfinite(output).all():
            bad_out += 1
        if not torch.isfinite(loss):
            bad_loss += 1
            where[tag] = where.get(tag, 0) + 1
            continue
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            bad_grad += 1
            where[tag] = where.get(tag, 0) + 1
            continue
        finite_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    median = statistics.median(finite_losses) if finite_losses else float("nan")
    ratio = max(finite_losses) / median if finite_losses and median > 0 else float("nan")
    return {"steps": steps, "nonfinite_loss": bad_loss, "nonfinite_grad": bad_grad, "nonfinite_output": bad_out,
            "max_loss_over_median": ratio, "where": where, "seconds": seconds}


def run(steps: int = 2000, seed: int = 0) -> list[dict]:
    """One row per loss: counts of non-finite losses / gradients / outputs and the largest loss-to-median ratio."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster than two, and reproducible
    try:
        for name, criterion in _losses().items():
            if criterion is None:
                rows.append({"loss": name, "steps": steps, "status": "n/a (DECODE not importable)"})
                continue
            rows.append({"loss": name, "status": "ok", **_train(criterion, steps, seed)})
    finally:
        torch.set_num_threads(threads)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| loss | steps | non-finite losses | non-finite gradients | non-finite net outputs | "
            "max loss / median | failing steps by scenario | time (s) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['loss']} | {r['steps']} | n/a | n/a | n/a | n/a | {r['status']} | |")
            continue
        where = ", ".join(f"{k} {v}" for k, v in sorted(r["where"].items())) or "none"
        lines.append(f"| {r['loss']} | {r['steps']} | {r['nonfinite_loss']} | {r['nonfinite_grad']} | "
                     f"{r['nonfinite_output']} | {r['max_loss_over_median']:.3g} | {where} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="training steps per loss (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = run(args.steps, args.seed)
    print(f"torch {torch.__version__}, 1 thread, frames {FRAME}x{FRAME}, batch {BATCH}, "
          f"seed {args.seed}")
    print(markdown(rows))
    ours = next(r for r in rows if r["loss"].startswith("AdaptivePPXYZB"))
    return 0 if ours["nonfinite_loss"] == 0 and ours["nonfinite_grad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
