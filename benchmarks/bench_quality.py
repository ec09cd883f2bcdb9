"""Localization quality of VARMultiScale against its ablations (and SigmaMUNet), by density and grid.

    python benchmarks/bench_quality.py [--densities 2 6 15 30] [--models NAME ...] [--seeds 0 1]
                                       [--samples N | --minutes M] [--threads T] [--evals K]
                                       [--test-size N] [--out DIR]

One fixed, seeded problem: 40 x 40 px frames, astigmatic Gaussian PSF, EMCCD camera, photons
7000 +- 3000, background 20-200 photons / px, ``--densities`` emitters per frame (about 0.1 to
1.9 per um^2 at 2 to 30), 3-frame window. Every model trains on the same simulated stream with the
same batch size, for the same number of training samples (``--samples``: sample efficiency,
robust to a shared CPU) or the same training-step wall clock (``--minutes``), and is evaluated on
the same test set (``--test-size`` frames, its own seed) with decode-var-eval's metrics (DECODE's
post-processing, matching and metrics, plus the CRLB ratio). ``--evals`` points along the way give
Jaccard against training samples seen *and* against training time.

Models (``--models``; default: the head-to-head set):

- ``VARMultiScale 2x``: next-scale prediction on the grids [0.25, 0.5, 1, 2] (super-resolved);
- ``VARMultiScale 1x``: the same on [0.25, 0.5, 1];
- ``single scale 1x`` / ``single scale 2x``: ``conditioning: single`` (the shared encoder and one
  conv head on the finest grid) on the 1x / 2x grid;
- ``independent heads 2x``: every scale its own head on [0.25, 0.5, 1, 2], no coarse-to-fine path;
- ``SigmaMUNet (DECODE)``: DECODE's model and loss with its settings (``param/sigmamunet_decode.yaml``),
  only where DECODE is installed;
- older ablations of the 1x model: no progressive schedule, static channel weights, teacher forcing off.

Every model reads ``VAR.model`` as the package defaults set it, so a default changed in the package
changes every row alike. ``--set KEY=VALUE`` (YAML value, dotted key) overrides a param key for
every model, e.g. ``--set VAR.model.token_max_factor=0.5``.

Per density the script also reports the share of ground-truth test emitters that share an input
pixel with another one (a 1x grid holds at most one emitter per pixel). The paired table compares
the lateral RMSE of every model with the first model of the same density and seed on the
ground-truth emitters that both found.

Results (``quality.json``: rows with curves, pairs, shared-pixel shares and the command) are
written to ``--out`` after every model; ``quality_curves.png`` plots Jaccard against samples seen.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from decode_var.backend import decode_available
from decode_var.config.param import param_from_dict

HERE = Path(__file__).resolve().parent
F1, F2 = [0.25, 0.5, 1.0], [0.25, 0.5, 1.0, 2.0]
BASE = {
    "Hardware": {"device": "cpu", "torch_threads": 1},
    "HyperParameter": {"epochs": 10 ** 6, "pseudo_ds_size": 256, "batch_size": 16,
                       "learning_rate_scheduler": "StepLR",
                       "learning_rate_scheduler_param": {"step_size": 10 ** 6, "gamma": 1.0}},
    "Simulation": {"emitter_av": 6.0, "intensity_mu_sig": [7000.0, 3000.0], "bg_uniform": [20.0, 200.0]},
    "TestSet": {"test_size": 512},
    "VAR": {"backend": "auto", "scales": F1,
            "teacher_forcing": {"start": 1.0, "end": 0.0, "epochs": 10},
            "loss": {"adaptive_interval": 4, "adaptive_window": 2, "warmup_epochs": 8},
            "train": {"plot": False, "eval_every": 10 ** 6}},
}

MODELS = {
    "VARMultiScale 2x": {"VAR": {"scales": F2}},
    "single scale 2x": {"VAR": {"scales": F2, "model": {"conditioning": "single"}}},
    "single scale 1x": {"VAR": {"scales": F1, "model": {"conditioning": "single"}}},
    "independent heads 2x": {"VAR": {"scales": F2, "model": {"conditioning": "independent"}}},
    "VARMultiScale 1x": {"VAR": {"scales": F1}},
    "SigmaMUNet (DECODE)": "sigmamunet",
    "ablation 1x: no progressive schedule": {"VAR": {"loss": {"scale_schedule": "none"}}},
    "ablation 1x: static channel weights": {"HyperParameter": {"loss_impl": "PPXYZB"},
                                            "VAR": {"loss": {"adaptive": False}}},
    "ablation 1x: teacher forcing off": {"VAR": {"teacher_forcing": {"start": 0.0, "end": 0.0}}},
}
HEAD_TO_HEAD = ["VARMultiScale 2x", "single scale 2x", "single scale 1x", "independent heads 2x",
                "VARMultiScale 1x", "SigmaMUNet (DECODE)"]


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dotted(assignments) -> dict:
    """``["VAR.model.depth=1", ...]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in assignments or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: use KEY=VALUE with a dotted key, e.g. VAR.model.depth=1")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def build_param(name: str, density: float, seed: int = 0, threads: int = 1, test_size: int = 512,
                overrides: dict | None = None):
    spec = MODELS[name]
    base = _merge(BASE, {"Simulation": {"emitter_av": density}, "Hardware": {"torch_threads": threads},
                         "TestSet": {"test_size": test_size}})
    if spec == "sigmamunet":
        import yaml

        sig = yaml.safe_load((HERE.parent / "param" / "sigmamunet_decode.yaml").read_text())
        data = _merge(sig, {k: v for k, v in base.items() if k != "VAR"})
        data["HyperParameter"]["architecture"], data["HyperParameter"]["loss_impl"] = "SigmaMUNet", "GaussianMMLoss"
        data["VAR"] = _merge(sig["VAR"], {"train": base["VAR"]["train"]})
    else:
        data = _merge(base, spec)
    data = _merge(data, overrides or {})
    data["VAR"]["seed"] = seed  # the training stream and the initial weights; the test set has its own seed
    return param_from_dict(data)


def train_for(param, workdir: Path, samples: int | None, minutes: float | None, evals: int):
    """Train until ``samples`` training samples (or ``minutes`` of training-step time); evaluate
    ``evals`` times along the way (evaluation time is not counted)."""
    from decode_var.training.trainer import Trainer

    trainer = Trainer(param, workdir, progress=False, log=False)
    per_epoch = max(param.HyperParameter.pseudo_ds_size // param.HyperParameter.batch_size, 1) \
        * param.HyperParameter.batch_size
    seen, spent, curve, k = 0, 0.0, [], 1

    def budget_used():
        return seen / samples if samples else spent / (minutes * 60)

    while budget_used() < 1.0:
        t0 = time.perf_counter()
        entry = trainer.train_epoch()
        spent += time.perf_counter() - t0
        seen += per_epoch
        trainer.history.append(entry)
        trainer.epoch += 1
        if budget_used() >= k / evals or budget_used() >= 1.0:
            _, _, m = trainer.evaluate()
            curve.append({"samples": seen, "minutes": spent / 60, "jac": m.get("jac", math.nan),
                          "rmse_lat": m.get("rmse_lat", math.nan)})
            while k / evals <= budget_used():
                k += 1
    return trainer, curve, seen, spent


@torch.no_grad()
def final_metrics(trainer, threads: int) -> tuple[dict, dict]:
    from decode_var.eval_cli import simulated_test_set

    frames, gt = simulated_test_set(trainer.protocol, trainer.simulator)
    x = trainer.frame_scale(frames)
    trainer.model.eval()
    t0 = time.process_time()
    with trainer.averaged():  # the weights that are saved (VAR.train.ema's average where set)
        outs = [trainer.task.physical_output(x[i:i + 64]) for i in range(0, x.size(0), 64)]
    cpu = time.process_time() - t0
    em = trainer.task.postprocess(torch.cat(outs))
    metrics, (tp, _, _, tp_match) = trainer.protocol.score(trainer.backend, trainer.matcher, em, gt)
    metrics["inference_fps_cpu"] = x.size(0) / max(cpu / threads, 1e-9)
    # lateral error (nm) of every matched ground-truth emitter, keyed by (frame, id), for the paired table
    d_lat = (tp.xyz_nm[:, :2] - tp_match.xyz_nm[:, :2]).norm(dim=1).tolist() if len(tp) else []
    keys = list(zip(tp_match.frame_ix.tolist(), tp_match.id.tolist())) if len(tp) else []
    return metrics, dict(zip(keys, d_lat))


def shared_pixel_share(param) -> dict:
    """Share of ground-truth test emitters whose input pixel holds another emitter of the same frame."""
    from decode_var.eval_cli import simulated_test_set
    from decode_var.training.components import build

    parts = build(param)
    _, gt = simulated_test_set(parts.protocol, parts.simulator)
    if not len(gt):
        return {"emitters": 0, "per_frame": 0.0, "shared_pixel": math.nan}
    pix = torch.floor(gt.xyz_px[:, :2] + 0.5).long()  # input pixel i spans [i - 0.5, i + 0.5)
    key = torch.stack([gt.frame_ix.long(), pix[:, 0], pix[:, 1]], 1)
    _, inverse, counts = key.unique(dim=0, return_inverse=True, return_counts=True)
    n_frames = parts.protocol.size()
    return {"emitters": len(gt), "per_frame": len(gt) / n_frames,
            "shared_pixel": float((counts[inverse] >= 2).float().mean())}


def paired(rows: list[dict], errors: list[dict], reference: str | None = None) -> list[dict]:
    """Lateral RMSE of each model against ``reference`` (default: the first model) of its density and
    seed on the ground-truth emitters that both found: a model that detects only the easiest
    (brightest) emitters gets a low RMSE on its own, and this compares like with like."""
    out = []
    groups = dict.fromkeys((r["density"], r["seed"]) for r in rows)
    for density, seed in groups:
        idx = [i for i, r in enumerate(rows) if r["density"] == density and r["seed"] == seed]
        ref = next((i for i in idx if rows[i]["model"] == reference), idx[0])
        idx = [ref] + [i for i in idx if i != ref]
        for i in idx[1:]:
            common = errors[ref].keys() & errors[i].keys()
            out.append({"density": density, "seed": seed, "model": rows[i]["model"], "reference": rows[ref]["model"],
                        "n_common": len(common), "rmse_lat": _rmse(errors[i], common),
                        "rmse_lat_reference": _rmse(errors[ref], common)})
    return out


def _rmse(err: dict, keys) -> float:
    return math.sqrt(sum(err[k] ** 2 for k in keys) / len(keys)) if keys else math.nan


def run(densities=(2.0, 6.0, 15.0, 30.0), models=None, seeds=(0,), samples: int | None = 4096,
        minutes: float | None = None, evals: int = 4, threads: int = 1, test_size: int = 512,
        overrides: dict | None = None, out: Path | None = None, command: str = "") -> dict:
    """Train and evaluate every (density, seed, model); returns the result dict that is saved."""
    torch.set_num_threads(threads)
    names = [m for m in (models or HEAD_TO_HEAD) if MODELS[m] != "sigmamunet" or decode_available()]
    res = {"command": command, "samples": samples, "minutes": minutes, "threads": threads,
           "test_size": test_size, "overrides": overrides or {}, "rows": [], "paired": [], "density": {}}
    errors = []
    for density in densities:
        res["density"][str(density)] = shared_pixel_share(build_param(names[0], density, 0, threads, test_size,
                                                                      overrides))
        for seed in seeds:
            for name in names:
                param = build_param(name, density, seed, threads, test_size, overrides)
                torch.manual_seed(seed)
                with tempfile.TemporaryDirectory() as tmp:
                    trainer, curve, seen, spent = train_for(param, Path(tmp), samples, minutes, evals)
                    m, err = final_metrics(trainer, threads)
                errors.append(err)
                # per matched ground-truth emitter "frame:id" -> lateral error (nm): pairs across runs
                res.setdefault("errors", []).append({f"{f}:{i}": round(e, 3) for (f, i), e in err.items()})
                res["rows"].append({"model": name, "density": density, "seed": seed, "epochs": trainer.epoch,
                                    "samples_seen": seen, "train_minutes": spent / 60,
                                    "train_samples_per_s": seen / max(spent, 1e-9),
                                    "nonfinite_steps": trainer.nonfinite_total, "curve": curve, **m})
                print(f"[bench_quality] {name} @ {density:g}/frame seed {seed}: jac {m.get('jac', math.nan):.3f} "
                      f"rmse_lat {m.get('rmse_lat', math.nan):.1f} nm ({seen} samples, {spent / 60:.1f} min)",
                      flush=True)
                res["paired"] = paired(res["rows"], errors)
                if out is not None:  # after every model: a run stopped later keeps what it measured
                    save(res, out)
    return res


def save(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res["rows"], out / "quality_curves.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = list(dict.fromkeys(r["density"] for r in rows))
    fig, axes = plt.subplots(1, len(densities), figsize=(5.5 * len(densities), 4), squeeze=False)
    names = list(dict.fromkeys(r["model"] for r in rows))
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, d in zip(axes[0], densities):
        for r in (r for r in rows if r["density"] == d):
            ax.plot([c["samples"] for c in r["curve"]], [c["jac"] for c in r["curve"]], "o-" if r["seed"] == 0 else "s--",
                    color=colours[r["model"]], label=f"{r['model']} (seed {r['seed']})")
        ax.set(xlabel="training samples seen", ylabel="Jaccard", ylim=(0, 1), title=f"{d:g} emitters / frame")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(res: dict) -> str:
    rows = res["rows"]
    out = ["| emitters/frame (share in a shared px) | model | seed | Jaccard | RMSE lat (nm) | CRLB ratio lat | "
           "RMSE ax (nm) | effcy lat | samples seen | train samples/s (wall) | non-finite steps |",
           "|" + "---|" * 11]
    for r in rows:
        g = lambda k: r.get(k, math.nan)  # noqa: E731
        share = res["density"].get(str(r["density"]), {}).get("shared_pixel", math.nan)
        out.append(f"| {r['density']:g} ({share:.1%}) | {r['model']} | {r['seed']} | {g('jac'):.3f} | "
                   f"{g('rmse_lat'):.1f} | {g('crlb_ratio_lat'):.2f} | {g('rmse_ax'):.1f} | {g('effcy_lat'):.3f} | "
                   f"{r['samples_seen']} | {g('train_samples_per_s'):.1f} | {r['nonfinite_steps']} |")
    return "\n".join(out)


def markdown_curves(res: dict) -> str:
    """Jaccard / lateral RMSE at every evaluation along training. Runs on a common sample budget
    share the header's sample counts; equal-time runs (each model at its own speed) say in each
    cell how many samples it had seen."""
    rows = res["rows"]
    n = max((len(r["curve"]) for r in rows), default=0)
    same = len({tuple(c["samples"] for c in r["curve"]) for r in rows}) <= 1
    if same:
        head = " | ".join(f"@{c['samples']}" for c in rows[0]["curve"]) if rows else ""
    else:
        head = " | ".join(f"eval {i + 1}" for i in range(n))
    out = [f"| emitters/frame | model | seed | Jaccard / RMSE lat (nm) {head} |", "|" + "---|" * (3 + max(n, 1))]
    for r in rows:
        cells = [f"{c['jac']:.3f} / {c.get('rmse_lat', math.nan):.1f}" + ("" if same else f" @{c['samples']}")
                 for c in r["curve"]]
        out.append(f"| {r['density']:g} | {r['model']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown_paired(pairs) -> str:
    out = ["| emitters/frame | seed | model | against | emitters both found | RMSE lat (nm) | RMSE lat of the other (nm) |",
           "|" + "---|" * 7]
    for p in pairs:
        out.append(f"| {p['density']:g} | {p['seed']} | {p['model']} | {p['reference']} | {p['n_common']} | "
                   f"{p['rmse_lat']:.1f} | {p['rmse_lat_reference']:.1f} |")
    return "\n".join(out)


def markdown_summary(res: dict) -> str:
    """One row per (density, model): the values of every seed side by side (seed 0 / seed 1 / ...)."""
    rows, pairs = res["rows"], res["paired"]
    out = ["| emitters/frame (in a shared px) | model | Jaccard | RMSE lat (nm) | paired RMSE lat: model vs reference (nm) "
           "| CRLB ratio lat | train samples/s (wall) |", "|" + "---|" * 7]
    for density in dict.fromkeys(r["density"] for r in rows):
        share = res["density"].get(str(density), {}).get("shared_pixel", math.nan)
        for name in dict.fromkeys(r["model"] for r in rows if r["density"] == density):
            rs = sorted((r for r in rows if r["density"] == density and r["model"] == name), key=lambda r: r["seed"])
            ps = [next((p for p in pairs if p["density"] == density and p["model"] == name and p["seed"] == r["seed"]),
                       None) for r in rs]

            def cell(key, fmt):
                return " / ".join(format(r.get(key, math.nan), fmt) for r in rs)
            pair = " / ".join(f"{p['rmse_lat']:.1f} vs {p['rmse_lat_reference']:.1f}" if p else "ref" for p in ps)
            out.append(f"| {density:g} ({share:.1%}) | {name} | {cell('jac', '.3f')} | {cell('rmse_lat', '.1f')} | {pair} "
                       f"| {cell('crlb_ratio_lat', '.2f')} | {cell('train_samples_per_s', '.1f')} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--samples", type=int, default=None, help="training samples per model (default 4096)")
    budget.add_argument("--minutes", type=float, default=None, help="training-step wall clock per model instead")
    ap.add_argument("--densities", type=float, nargs="+", default=[2.0, 6.0, 15.0, 30.0], metavar="N")
    ap.add_argument("--density", action="store_true", help=argparse.SUPPRESS)  # old flag: the default now
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS), metavar="NAME",
                    help=f"default: {HEAD_TO_HEAD}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (VAR.seed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--evals", type=int, default=4, help="evaluations along the training curve")
    ap.add_argument("--test-size", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param key for every model, e.g. VAR.model.token_max_factor=0.5")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only print the tables of saved quality.json files (merged; pairs recomputed "
                         "against --reference)")
    ap.add_argument("--reference", default="VARMultiScale 2x", help="reference model of the paired table")
    args = ap.parse_args(argv)
    if args.summarize:
        parts = [json.loads(p.read_text()) for p in args.summarize]
        res = {"rows": [r for p in parts for r in p["rows"]],
               "density": {k: v for p in parts for k, v in p["density"].items()}}
        errors = [{tuple(map(int, k.split(":"))): v for k, v in e.items()}
                  for p in parts for e in p.get("errors", [{}] * len(p["rows"]))]
        res["paired"] = paired(res["rows"], errors, args.reference)
        for p in parts:
            print(p.get("command", ""))
        print(markdown_summary(res))
        print("\nJaccard / lateral RMSE along training (samples seen):\n")
        print(markdown_curves(res))
        return
    samples = args.samples if args.samples or args.minutes else 4096
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    print(command, flush=True)
    res = run(tuple(args.densities), args.models, tuple(args.seeds), samples, args.minutes, args.evals,
              args.threads, args.test_size, _dotted(args.set), args.out, command)
    print(command)
    print(markdown(res))
    print("\nPer model, seeds side by side:\n")
    print(markdown_summary(res))
    print("\nJaccard / lateral RMSE along training (samples seen):\n")
    print(markdown_curves(res))
    if res["paired"]:
        print("\nLateral RMSE on the ground-truth emitters that both models found (paired):\n")
        print(markdown_paired(res["paired"]))


if __name__ == "__main__":
    main()
