"""``decode-var-train`` / ``python -m decode_var.train``: DECODE's live_engine flags, decode-var's registry.

    decode-var-train -p param.yaml [-i cpu] [-d] [-w N] [-n] [-l runs] [-c comment]

``HyperParameter.architecture`` and ``HyperParameter.loss_impl`` select the model and loss. The
experiment folder ``InOut.experiment_out/<date>_<time>_<host>[_<comment>]`` gets DECODE's files:
``param_run_in.yaml`` (the file as given), ``param_run.yaml`` (filled and derived), ``model.pt``,
``ckpt.pt``; plus ``history.json`` and ``training_curves.png``. Set ``InOut.checkpoint_init`` to a
``ckpt.pt`` to resume in its folder.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DecodeVarError


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="decode-var-train", description="Train a decode-var (or DECODE) model "
                                "from a DECODE param file.")
    p.add_argument("-i", "--device", default=None, help="device (cpu, cuda, cuda:0); overrides Hardware.device")
    p.add_argument("-p", "--param_file", required=True, help="param file (.yaml / .json)")
    p.add_argument("-d", "--debug", action="store_true", help="debug: small data set, experiment folder 'debug'")
    p.add_argument("-w", "--num_worker_override", type=int, default=None, help="override Hardware.num_worker_train")
    p.add_argument("-n", "--no_log", action="store_true", help="no TensorBoard log")
    p.add_argument("-l", "--log_folder", default="runs", help="parent folder of the TensorBoard logs")
    p.add_argument("-c", "--log_comment", default=None, help="comment appended to the experiment name")
    p.add_argument("-r", "--resume", default=None, metavar="CKPT",
                   help="resume from this ckpt.pt (same as setting InOut.checkpoint_init)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary unpickling for InOut.model_init (only for files you trust)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and epoch lines")
    return p.parse_args(argv)


def setup_experiment(param_file: Path, param, debug: bool, comment: Optional[str]) -> tuple[Path, bool]:
    """(experiment folder, resuming?). Never overwrites an existing experiment."""
    from .atomic import atomic_write_bytes
    from .param import save_param

    ckpt = param.InOut.checkpoint_init
    if ckpt:
        exp = Path(ckpt).parent
        resuming = True
    else:
        resuming = False
        if debug:
            name = "debug"
        else:
            name = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_" + socket.gethostname()
            if comment:
                name += "_" + comment
        exp = Path(param.InOut.experiment_out) / name
        if exp.exists() and not debug:
            raise DecodeVarError(f"Experiment folder {exp} exists already; it is not overwritten. "
                                 "Use another -c comment, or resume with InOut.checkpoint_init.")
        exp.mkdir(parents=True, exist_ok=debug)
    suffix = param_file.suffix
    run_in, run = exp / f"param_run_in{suffix}", exp / f"param_run{suffix}"
    if resuming and run_in.exists():
        # keep the files of the first run; record what this run was started with
        run_in, run = exp / f"param_resume_in{suffix}", exp / f"param_resume{suffix}"
    atomic_write_bytes(run_in, param_file.read_bytes())
    save_param(run, param)
    return exp, resuming


def train(param_file, device: Optional[str] = None, debug: bool = False, no_log: bool = False,
          num_worker_override: Optional[int] = None, log_folder: str = "runs", log_comment: Optional[str] = None,
          trust_pickle: bool = False, progress: bool = True, overrides: Optional[dict] = None):
    """Programmatic entry point; returns the :class:`~decode_var.engine.Trainer` after training."""
    from .checkpoint import load_checkpoint, load_model_weights
    from .engine import Trainer
    from .param import load_param

    param_file = Path(param_file)
    param = load_param(param_file, overrides=overrides)
    if debug:
        param.HyperParameter.pseudo_ds_size = min(param.HyperParameter.pseudo_ds_size, 256)
        param.TestSet.test_size = min(param.TestSet.test_size, 64)
    if num_worker_override is not None:
        param.Hardware.num_worker_train = num_worker_override
    device = device or param.Hardware.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"[decode-var] {device} is not available here; training on the CPU.", file=sys.stderr)
        device = "cpu"
    torch.set_num_threads(int(param.Hardware.torch_threads))
    if param.Hardware.device_simulation != "cpu" and device == "cpu":
        param.Hardware.device_simulation = "cpu"
    state = load_checkpoint(param.InOut.checkpoint_init) if param.InOut.checkpoint_init else None
    exp, resuming = setup_experiment(param_file, param, debug, log_comment)
    tb_dir = None if no_log else Path(log_folder) / exp.name
    trainer = Trainer(param, exp, device=device, log=True, tb_dir=tb_dir, progress=progress)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"[decode-var] resuming {exp} at epoch {trainer.epoch}"
              + (f", step {trainer._partial['step']}" if trainer._partial else ""), file=sys.stderr)
    elif param.InOut.model_init:
        load_model_weights(trainer.model, param.InOut.model_init, trusted=trust_pickle)
    if progress:
        print(f"[decode-var] experiment {exp}  backend {trainer.backend.name}  model "
              f"{param.HyperParameter.architecture}  loss {param.HyperParameter.loss_impl}  device {device}",
              file=sys.stderr)
    trainer.fit()
    return trainer


def resume_command(param_file: Path, exp: Path) -> str:
    return f"decode-var-train -p {exp / ('param_run' + param_file.suffix)} --resume {exp / 'ckpt.pt'}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .engine import TrainingDiverged, TrainingInterrupted

    args = parse_args(argv)
    try:
        overrides = {"InOut": {"checkpoint_init": args.resume}} if args.resume else None
        train(args.param_file, args.device, args.debug, args.no_log, args.num_worker_override, args.log_folder,
              args.log_comment, args.trust_pickle, progress=not args.no_progress, overrides=overrides)
    except TrainingInterrupted as err:
        print(f"decode-var-train: {err}.", file=sys.stderr)
        print("Resume with:\n  " + _resume_hint(args.param_file, err), file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"decode-var-train: {err}", file=sys.stderr)
        return 3
    except DecodeVarError as err:
        print(f"decode-var-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"decode-var-train: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(param_file, err) -> str:
    exp = getattr(err, "exp_dir", None)
    if exp is None:
        return "decode-var-train -p <experiment>/param_run.yaml --resume <experiment>/ckpt.pt"
    return resume_command(Path(param_file), Path(exp))


if __name__ == "__main__":
    sys.exit(main())
