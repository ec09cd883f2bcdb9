"""Sparse coarse-to-fine inference against the dense path: the same emitters at the same positions?

For each density (``--densities``, emitters per 40 x 40 px frame) the protocol's seeded test set of the
model's param, with ``Simulation.emitter_av`` set to that density (:mod:`decode_var.evaluation.protocol`),
is localized twice by :class:`~decode_var.inference.predictor.Predictor`: dense (every scale on every
pixel, as in training) and sparse (``--thresholds``, :mod:`decode_var.nn.sparse`), the sparse path forced
on every batch (a fit runs the finer scales dense where that is estimated to be faster: ``auto_path``,
with the estimated cost ratio, for the first batch). Per threshold:

- Jaccard, precision, recall and lateral RMSE of both against the ground truth (the protocol's score);
- the localizations of one path that the other lacks (no localization of the same frame within 0.5 px),
  and the largest x, y distance between paired localizations (px), z (nm), photons;
- the share of finest cells the sparse path computed, and the network's seconds of both paths
  (in-process, the same thread count, run alternately).

The targets (issue 24): Jaccard within 0.002 of the dense path's and positions within 0.01 px.

Run: ``python benchmarks/bench_sparse.py --model out/quickstart/<exp> [--densities 2 6 15 30]
[--thresholds 0.01] [--n 512] [--json benchmarks/results/bench_sparse.json]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_var.config.param import load_param, param_from_dict  # noqa: E402
from decode_var.eval_cli import simulated_test_set  # noqa: E402
from decode_var.inference.predictor import Predictor, resolve_model_path  # noqa: E402
from decode_var.nn import sparse  # noqa: E402


def pair(a, b, radius: float = 0.5) -> dict:
    """Localizations of ``a`` and ``b`` paired by frame and nearest x, y within ``radius`` px."""
    only_a, dxy, dz, dphot = 0, 0.0, 0.0, 0.0
    matched_b = torch.zeros(len(b), dtype=torch.bool)
    for f in torch.unique(torch.cat([a.frame_ix, b.frame_ix])).tolist():
        ia, ib = (a.frame_ix == f).nonzero().flatten(), (b.frame_ix == f).nonzero().flatten()
        if len(ib) == 0:
            only_a += len(ia)
            continue
        for i in ia.tolist():
            d = (b.xyz_px[ib, :2] - a.xyz_px[i, :2]).norm(dim=1)
            j = int(d.argmin())
            if d[j] > radius:
                only_a += 1
                continue
            matched_b[ib[j]] = True
            dxy = max(dxy, float((b.xyz_px[ib[j], :2] - a.xyz_px[i, :2]).abs().max()))
            dz = max(dz, float((b.xyz_px[ib[j], 2] - a.xyz_px[i, 2]).abs()))
            dphot = max(dphot, float((b.phot[ib[j]] - a.phot[i]).abs()))
    return {"only_dense": only_a, "only_sparse": int((~matched_b).sum()), "max_dxy_px": dxy, "max_dz_nm": dz,
            "max_dphot": dphot}


def timed_predict(pred: Predictor, frames, batch: int):
    t0 = time.perf_counter()
    em = pred.predict(frames, batch_size=batch)
    return em, time.perf_counter() - t0


def one_density(exp: Path, density: float, thresholds, n: int, batch: int) -> list[dict]:
    d = load_param(exp / "param_run.yaml").to_dict()
    d["Simulation"]["emitter_av"] = float(density)
    param = param_from_dict(d)
    dense = Predictor(param, resolve_model_path(exp), sparse=False)
    protocol = dense.parts.protocol
    frames, gt = simulated_test_set(protocol, dense.parts.simulator, n)
    em_d, t_d = timed_predict(dense, frames, batch)
    m_d, _ = protocol.score(dense.backend, dense.parts.matcher, em_d, gt)
    rows = []
    for th in thresholds:
        sp = Predictor(param, resolve_model_path(exp), sparse=True, sparse_threshold=th, sparse_max_cost=math.inf)
        em_s, t_s = timed_predict(sp, frames, batch)
        _, t_d2 = timed_predict(dense, frames, batch)
        m_s, _ = protocol.score(sp.backend, sp.parts.matcher, em_s, gt)
        stats: dict = {}
        with torch.no_grad():
            sparse.sparse_forward(sp.model, sp.to_network(frames[:batch]).contiguous(memory_format=torch.channels_last),
                                  th, max_cost=math.inf, stats=stats)
        row = {"density": density, "threshold": th, "n_gt": len(gt), "active_share": stats["active_share"],
               "auto_path": "sparse" if stats["cost_ratio"] < 1.0 else "dense", "cost_ratio": stats["cost_ratio"],
               "dense": {k: m_d[k] for k in ("jac", "prec", "rec", "rmse_lat")},
               "sparse": {k: m_s[k] for k in ("jac", "prec", "rec", "rmse_lat")},
               "d_jac": m_s["jac"] - m_d["jac"], **pair(em_d, em_s),
               "dense_s": min(t_d, t_d2), "sparse_s": t_s}
        rows.append(row)
        print(f"density {density:4g} th {th:g}: jac dense {m_d['jac']:.4f} sparse {m_s['jac']:.4f} "
              f"(d {row['d_jac']:+.4f}); only dense {row['only_dense']}, only sparse {row['only_sparse']}, "
              f"max dxy {row['max_dxy_px']:.2e} px, dz {row['max_dz_nm']:.2e} nm; computed "
              f"{row['active_share']:.1%} of finest cells", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="experiment folder (param_run.yaml + model.pt)")
    ap.add_argument("--densities", type=float, nargs="+", default=[2.0, 6.0, 15.0, 30.0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[sparse.DEFAULT_THRESHOLD])
    ap.add_argument("--n", type=int, default=512, help="test-set samples per density")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ring", type=int, default=sparse.DEFAULT_RING, help="finest cells around the refined region")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sparse.DEFAULT_RING = args.ring
    rows = []
    for density in args.densities:
        rows += one_density(Path(args.model), density, args.thresholds, args.n, args.batch)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
