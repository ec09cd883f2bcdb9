"""Localization quality at an equal CPU training budget, VARMultiScale against SigmaMUNet and ablations.

    python benchmarks/bench_quality.py [--minutes 10] [--density | --densities N ...] [--models NAME ...]
                                       [--evals 5] [--out DIR]

One fixed, seeded problem: 40 x 40 px frames, astigmatic Gaussian PSF, EMCCD camera, photons
7000 +- 3000, background 20-200 photons / px, about 6 emitters per frame, 3-frame window. Every model
trains for the same wall-clock budget (training steps only; the periodic test evaluations are
not counted), then is evaluated on the same 512-frame test set with decode-var-eval's metrics
(DECODE's post-processing, matching and metrics, plus the CRLB ratio).

Models: VARMultiScale + AdaptivePPXYZB as shipped; DECODE's SigmaMUNet + GaussianMMLoss (only where
DECODE is installed); ablations of ours: single scale, independent multi-scale heads (no
conditioning), no progressive schedule, static channel weights, teacher forcing off.
``--density`` repeats the table at about 2 and about 15 emitters per frame.

SigmaMUNet uses ``param/sigmamunet_decode.yaml``: DECODE's architecture and optimiser settings
(AdamW, lr 2e-4, weight decay 0.1, ``grad_mod``), on the same simulation and batch size.

A second table compares the lateral RMSE of every model with the first one of its density on the
ground-truth emitters that both found: a model that reports only the easiest emitters has a low
RMSE of its own, and the paired figure compares like with like. Results (``quality.json`` with
rows, curves and pairs; ``quality_curves.png``) are written to ``--out`` after every model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from decode_var.backend import decode_available
from decode_var.param import param_from_dict

HERE = Path(__file__).resolve().parent
BASE = {
    "Hardware": {"device": "cpu", "torch_threads": 2},
    "HyperParameter": {"epochs": 10 ** 6, "pseudo_ds_size": 256, "batch_size": 16,
                       "learning_rate_scheduler": "StepLR",
                       "learning_rate_scheduler_param": {"step_size": 10 ** 6, "gamma": 1.0}},
    "Simulation": {"emitter_av": 6.0, "intensity_mu_sig": [7000.0, 3000.0], "bg_uniform": [20.0, 200.0]},
    "TestSet": {"test_size": 512},
    "VAR": {"backend": "auto", "scales": [0.25, 0.5, 1.0],
            "teacher_forcing": {"start": 1.0, "end": 0.0, "epochs": 10},
            "loss": {"adaptive_interval": 4, "adaptive_window": 2, "warmup_epochs": 8},
            "train": {"plot": False, "eval_every": 10 ** 6}},
}

MODELS = {
    "VARMultiScale + AdaptivePPXYZB": {},
    "SigmaMUNet + GaussianMMLoss (DECODE)": "sigmamunet",
    "ablation: single scale": {"VAR": {"model": {"conditioning": "single"}}},
    "ablation: independent heads": {"VAR": {"model": {"conditioning": "independent"}}},
    "ablation: no progressive schedule": {"VAR": {"loss": {"scale_schedule": "none"}}},
    "ablation: static channel weights": {"HyperParameter": {"loss_impl": "PPXYZB"},
                                         "VAR": {"loss": {"adaptive": False}}},
    "ablation: teacher forcing off": {"VAR": {"teacher_forcing": {"start": 0.0, "end": 0.0}}},
}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_param(name: str, density: float):
    spec = MODELS[name]
    base = _merge(BASE, {"Simulation": {"emitter_av": density}})
    if spec == "sigmamunet":
        import yaml

        sig = yaml.safe_load((HERE.parent / "param" / "sigmamunet_decode.yaml").read_text())
        data = _merge(sig, {k: v for k, v in base.items() if k != "VAR"})
        data["HyperParameter"]["architecture"], data["HyperParameter"]["loss_impl"] = "SigmaMUNet", "GaussianMMLoss"
        data["VAR"] = _merge(sig["VAR"], {"train": base["VAR"]["train"]})
    else:
        data = _merge(base, spec)
    return param_from_dict(data)


def train_for(param, minutes: float, evals: int, workdir: Path):
    """Train for ``minutes`` of training-step time; evaluate ``evals`` times along the way."""
    from decode_var.engine import Trainer

    trainer = Trainer(param, workdir, progress=False, log=False)
    budget, spent, curve = minutes * 60, 0.0, []
    next_eval = budget / evals
    while spent < budget:
        t0 = time.perf_counter()
        entry = trainer.train_epoch()
        spent += time.perf_counter() - t0
        trainer.history.append(entry)
        trainer.epoch += 1
        if spent >= next_eval or spent >= budget:
            _, _, m = trainer.evaluate()
            curve.append({"minutes": spent / 60, "jac": m.get("jac", math.nan), "rmse_lat": m.get("rmse_lat", math.nan)})
            next_eval += budget / evals
    return trainer, curve


@torch.no_grad()
def final_metrics(trainer) -> dict:
    from decode_var.eval_cli import evaluate_emitters, simulated_test_set

    frames, gt = simulated_test_set(trainer.param, trainer.backend)
    x = trainer.frame_scale(frames)
    trainer.model.eval()
    t0 = time.perf_counter()
    outs = [trainer.task.physical_output(x[i:i + 64]) for i in range(0, x.size(0), 64)]
    fps = x.size(0) / (time.perf_counter() - t0)
    em = trainer.task.postprocess(torch.cat(outs))
    metrics, (tp, _, _, tp_match) = evaluate_emitters(trainer.param, trainer.backend, em, gt)
    metrics["inference_fps"] = fps
    # lateral error (nm) of every matched ground-truth emitter, keyed by (frame, id), for the paired table
    d_lat = (tp.xyz_nm[:, :2] - tp_match.xyz_nm[:, :2]).norm(dim=1).tolist() if len(tp) else []
    keys = list(zip(tp_match.frame_ix.tolist(), tp_match.id.tolist())) if len(tp) else []
    return metrics, dict(zip(keys, d_lat))


def paired(rows: list[dict], errors: list[dict]) -> list[dict]:
    """Lateral RMSE of each model against the first model of its density on the ground-truth emitters
    that both found: a model that detects only the easiest (brightest) emitters gets a low RMSE on its
    own, and this compares like with like."""
    out = []
    for density in dict.fromkeys(r["density"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["density"] == density]
        ref = idx[0]
        for i in idx[1:]:
            common = errors[ref].keys() & errors[i].keys()
            out.append({"density": density, "model": rows[i]["model"], "reference": rows[ref]["model"],
                        "n_common": len(common), "rmse_lat": _rmse(errors[i], common),
                        "rmse_lat_reference": _rmse(errors[ref], common)})
    return out


def _rmse(err: dict, keys) -> float:
    return math.sqrt(sum(err[k] ** 2 for k in keys) / len(keys)) if keys else math.nan


def run(minutes: float = 10.0, densities=(6.0,), models=None, evals: int = 5, out: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(one row per model and density, the paired RMSE rows)."""
    torch.set_num_threads(2)
    rows, errors = [], []
    names = [m for m in (models or MODELS) if MODELS[m] != "sigmamunet" or decode_available()]
    for density in densities:
        for name in names:
            param = build_param(name, density)
            with tempfile.TemporaryDirectory() as tmp:
                trainer, curve = train_for(param, minutes, evals, Path(tmp))
                m, err = final_metrics(trainer)
            errors.append(err)
            steps = sum(max(param.HyperParameter.pseudo_ds_size // param.HyperParameter.batch_size, 1)
                        for _ in trainer.history)
            train_time = sum(h["seconds"] for h in trainer.history)
            rows.append({"model": name, "density": density, "epochs": trainer.epoch, "steps": steps,
                         "train_samples_per_s": steps * param.HyperParameter.batch_size / max(train_time, 1e-9),
                         "nonfinite_steps": trainer.nonfinite_total, "curve": curve, **m})
            print(f"[bench_quality] {name} @ {density}/frame: jac {m.get('jac', math.nan):.3f} "
                  f"rmse_lat {m.get('rmse_lat', math.nan):.1f} nm", flush=True)
            if out is not None:  # after every model: a run stopped later keeps what it measured
                save(rows, paired(rows, errors), out)
    return rows, paired(rows, errors)


def save(rows, pairs, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"rows": rows, "paired": pairs}, indent=1, default=float))
    plot(rows, out / "quality_curves.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        t = [c["minutes"] for c in r["curve"]]
        label = f"{r['model']} ({r['density']:g}/frame)"
        ax[0].plot(t, [c["jac"] for c in r["curve"]], "o-", label=label)
        ax[1].plot(t, [c["rmse_lat"] for c in r["curve"]], "o-", label=label)
    ax[0].set(xlabel="training time (min, 2 CPU cores)", ylabel="Jaccard", ylim=(0, 1))
    ax[1].set(xlabel="training time (min, 2 CPU cores)", ylabel="lateral RMSE (nm)")
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(rows) -> str:
    head = ("| model | emitters/frame | Jaccard | RMSE lat (nm) | RMSE ax (nm) | effcy lat | effcy ax | "
            "CRLB ratio lat | train samples/s | inference frames/s | non-finite steps |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        g = lambda k: r.get(k, math.nan)  # noqa: E731
        out.append(f"| {r['model']} | {r['density']:g} | {g('jac'):.3f} | {g('rmse_lat'):.1f} | {g('rmse_ax'):.1f} | "
                   f"{g('effcy_lat'):.3f} | {g('effcy_ax'):.3f} | {g('crlb_ratio_lat'):.2f} | "
                   f"{g('train_samples_per_s'):.1f} | {g('inference_fps'):.0f} | {r['nonfinite_steps']} |")
    return "\n".join(out)


def markdown_paired(pairs) -> str:
    out = ["| model | emitters/frame | against | emitters both found | RMSE lat (nm) | RMSE lat of the other (nm) |",
           "|" + "---|" * 6]
    for p in pairs:
        out.append(f"| {p['model']} | {p['density']:g} | {p['reference']} | {p['n_common']} | {p['rmse_lat']:.1f} | "
                   f"{p['rmse_lat_reference']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    ap.add_argument("--density", action="store_true", help="also at about 2 and 15 emitters per frame")
    ap.add_argument("--densities", type=float, nargs="+", default=None, metavar="N",
                    help="emitters per frame to run at (default 6; --density is 6 2 15)")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS), metavar="NAME")
    ap.add_argument("--evals", type=int, default=5, help="evaluations along the training curve")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    dens = tuple(args.densities) if args.densities else (6.0, 2.0, 15.0) if args.density else (6.0,)
    rows, pairs = run(args.minutes, dens, args.models, args.evals, args.out)
    print(markdown(rows))
    if pairs:
        print("\nLateral RMSE on the ground-truth emitters that both models found (paired):\n")
        print(markdown_paired(pairs))
