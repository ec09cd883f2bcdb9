"""``decode-var-run``: from your movie and what you know of the microscope to localizations, in one command.

    decode-var-run --frames movie.tif --param known.yaml --out DIR --minutes N [--format decode picasso ...]

Three stages, each shown as ``[k/3]``, each a command of its own that can also be run by hand:

1. ``decode-var-init``: the simulation's param estimated from the movie and ``known.yaml`` ->
   ``DIR/param.yaml`` (+ ``DIR/param_report.png``);
2. ``decode-var-train --minutes N`` on that param -> ``DIR/train/<experiment>/model.pt`` (the epochs and the
   learning-rate decay are set from the budget);
3. ``decode-var-fit`` of the movie with that model -> ``DIR/emitters.h5``, the ``--format`` exports and the
   rendering.

**Run again after an interruption, it continues where it stopped**: a written ``DIR/param.yaml`` is reused (its
estimation is not repeated), a finished training is reused (``DIR/train/done.json`` names its experiment) and a
stopped one is resumed from its checkpoint, and a stopped fit continues from its finished blocks
(``decode-var-fit --resume``). A stage that fails ends the run with one line and exit status 2; nothing a
finished stage wrote is lost.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from decode_var import fit as fit_cli, init_cli
from decode_var.core.atomic import atomic_write_text
from decode_var.core.errors import DecodeVarError, InputDataError, exit_status
from decode_var.core.log import note
from decode_var.inference.blocks import partial_folder
from decode_var.train import train

PROG = "decode-var-run"
STAGES = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="Estimate the param from your movie, train a model for a "
                                                       "wall-clock budget, and fit the movie with it.")
    p.add_argument("--frames", required=True, help="the movie: a TIFF stack or a folder of TIFF files (raw ADU)")
    p.add_argument("--param", required=True, help="known.yaml: what you know (Camera keys, px_size, optionally a "
                                                  "spline calibration or VAR.gaussian_psf.mode_3d: false)")
    p.add_argument("--out", required=True, help="folder for everything the run writes")
    p.add_argument("--minutes", type=float, required=True, help="training budget in minutes of wall-clock time")
    p.add_argument("--format", nargs="+", default=["decode"], choices=("decode", "picasso", "thunderstorm"),
                   help="emitter files to write, as decode-var-fit --format")
    p.add_argument("-i", "--device", default=None, help="cpu, cuda, ... (default: the param's Hardware.device)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _stage(k: int, what: str) -> None:
    note(f"[{k}/{STAGES}] {what}")


def estimate(args, out: Path) -> Path:
    """Stage 1: ``out/param.yaml``, or the one a previous run wrote."""
    param = out / "param.yaml"
    if param.exists():
        _stage(1, f"param: reusing {param} (delete it to estimate again)")
        return param
    _stage(1, f"param: estimating from {args.frames} and {args.param}")
    if init_cli.main(["--frames", str(args.frames), "--param", str(args.param), "--out", str(param)]) != 0:
        raise _StageFailed("estimating the param")
    return param


def trained_model(args, out: Path, param: Path) -> Path:
    """Stage 2: the experiment folder of a finished training: a previous run's, a stopped one resumed, or new."""
    done = out / "train" / "done.json"
    if done.exists():
        exp = Path(json.loads(done.read_text())["experiment"])
        if (exp / "model.pt").exists():
            _stage(2, f"model: reusing {exp} (delete {done} to train again)")
            return exp
    overrides = {"InOut": {"experiment_out": str(out / "train")}}
    stopped = sorted((out / "train").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if stopped:
        overrides["InOut"]["checkpoint_init"] = str(stopped[-1])
        _stage(2, f"model: resuming the stopped training {stopped[-1].parent}")
    else:
        _stage(2, f"model: training for {args.minutes:g} min")
    trainer = train(param, device=args.device, no_log=True, progress=not args.no_progress, overrides=overrides,
                    minutes=args.minutes)
    atomic_write_text(done, json.dumps({"experiment": str(trainer.exp_dir), "epochs": trainer.epoch}))
    return Path(trainer.exp_dir)


def fitted(args, out: Path, exp: Path) -> Path:
    """Stage 3: ``out/emitters.h5`` and the exports; a stopped fit continues from its finished blocks."""
    emitters = out / "emitters.h5"
    done = out / "fit_done.json"
    if done.exists() and emitters.exists():
        _stage(3, f"localizations: reusing {emitters} (delete {done} to fit again)")
        return emitters
    resume = partial_folder(emitters).exists()
    _stage(3, f"localizations: {'continuing the stopped fit' if resume else 'fitting'} {args.frames}")
    argv = ["-p", str(exp / "param_run.yaml"), "--model", str(exp), "--frames", str(args.frames),
            "--out", str(emitters), "--format", *args.format] + (["--resume"] if resume else [])
    argv += (["-i", args.device] if args.device else []) + (["--no-progress"] if args.no_progress else [])
    if fit_cli.main(argv) != 0:
        raise _StageFailed("fitting the movie")
    atomic_write_text(done, json.dumps({"experiment": str(exp), "emitters": str(emitters)}))
    return emitters


class _StageFailed(DecodeVarError):
    """A stage's own command failed and said why; the run stops there."""


def run(args) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} is a file; give a folder (it is created if missing).")
    if not args.minutes > 0:
        raise InputDataError(f"--minutes {args.minutes:g}: give the training budget in minutes, > 0.")
    out.mkdir(parents=True, exist_ok=True)
    param = estimate(args, out)
    exp = trained_model(args, out, param)
    return fitted(args, out, exp)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        emitters = run(args)
    except _StageFailed as err:
        print(f"{PROG}: stopped while {err}; run the same command again to continue from there.", file=sys.stderr)
        return 2
    except (DecodeVarError, OSError, KeyboardInterrupt) as err:
        return exit_status(PROG, err, kept=f"what the finished stages wrote in {args.out}; run the same command "
                                           "again to continue")
    print(f"done: {emitters} (param {Path(args.out) / 'param.yaml'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
