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
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from decode_var.config.param import load_param, save_param
from decode_var.core.atomic import atomic_write_bytes
from decode_var.core.devices import check_device, parse_device
from decode_var.core.errors import DecodeVarError, ParamError, exit_status
from decode_var.core.log import note, warn
from decode_var.core.outputs import check_output_folder
from decode_var.training import distributed
from decode_var.training.checkpoint import load_checkpoint, load_model_weights
from decode_var.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="decode-var-train", description="Train a decode-var (or DECODE) model "
                                "from a DECODE param file.")
    p.add_argument("-i", "--device", default=None, help="device (cpu, cuda, cuda:0); overrides Hardware.device")
    p.add_argument("-p", "--param_file", required=True, help="param file (.yaml / .json)")
    p.add_argument("-d", "--debug", action="store_true", help="debug: small data set, experiment folder 'debug'")
    p.add_argument("-w", "--num_worker_override", type=int, default=None,
                   help="override Hardware.num_worker_train; only 0 is accepted (see train.check_num_workers)")
    p.add_argument("-n", "--no_log", action="store_true", help="no TensorBoard log")
    p.add_argument("-l", "--log_folder", default="runs", help="parent folder of the TensorBoard logs")
    p.add_argument("-c", "--log_comment", default=None, help="comment appended to the experiment name")
    p.add_argument("-r", "--resume", default=None, metavar="CKPT",
                   help="resume from this ckpt.pt (same as setting InOut.checkpoint_init)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary unpickling for InOut.model_init (only for files you trust)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and epoch lines")
    p.add_argument("--minutes", type=_positive_minutes, default=None, metavar="N",
                   help="train for N minutes of wall-clock time: the epochs (and the learning-rate decay) are "
                        "set from the first epoch's time, instead of HyperParameter.epochs")
    return p.parse_args(argv)


def setup_experiment(param_file: Path, param, debug: bool, comment: Optional[str]) -> tuple[Path, bool]:
    """(experiment folder, resuming?). Never overwrites an existing experiment."""
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


#: Free space a run needs, per model parameter: model.pt (4 bytes), ckpt.pt (model and Adam's two moments, 12)
#: and the new ckpt.pt written beside the old one before it replaces it (12 more): 28, rounded up.
BYTES_PER_PARAMETER = 32
#: Plus history.json, training_curves.png and the param files.
RUN_EXTRA_BYTES = 10_000_000


def experiment_parent(param) -> tuple[Path, str]:
    """(the folder a run writes in: InOut.experiment_out, or the resumed experiment; the key that sets it).

    A new experiment folder is new (setup_experiment never reuses one), so no input can be one of its files.
    """
    ckpt = param.InOut.checkpoint_init
    if ckpt:
        return Path(ckpt).parent, "InOut.checkpoint_init"
    return Path(param.InOut.experiment_out), "InOut.experiment_out"


def train(param_file, device: Optional[str] = None, debug: bool = False, no_log: bool = False,
          num_worker_override: Optional[int] = None, log_folder: str = "runs", log_comment: Optional[str] = None,
          trust_pickle: bool = False, progress: bool = True, overrides: Optional[dict] = None,
          minutes: Optional[float] = None):
    """Programmatic entry point; returns the :class:`~decode_var.training.trainer.Trainer` after training.
    ``minutes``: train for this wall-clock budget (:meth:`Trainer.fit`) instead of ``HyperParameter.epochs``.

    Launched by torchrun with ``WORLD_SIZE > 1``, every rank joins the process group and trains one
    model with DDP (see :mod:`decode_var.training.distributed`); the group is left again at the end.
    """
    try:
        return _train(param_file, device, debug, no_log, num_worker_override, log_folder, log_comment, trust_pickle,
                      progress, overrides, minutes)
    except RuntimeError as err:
        ctx = distributed.current()
        if ctx is not None and not isinstance(err, DecodeVarError) and distributed.is_comm_error(err):
            raise ctx.lost_contact(err) from err
        raise
    finally:
        distributed.shutdown_owned()


def check_num_workers(n: int) -> None:
    """``-w``: simulation in DataLoader worker processes is not implemented; only 0 is accepted.

    Every batch is simulated in the training process from seeds derived from (VAR.seed, epoch, step),
    which is what makes a run, and a run resumed mid-epoch, bit for bit the same. Workers would need
    the same per-sample seeds inside each worker and a resumable sampler; until then a value > 0 is
    refused rather than silently ignored.
    """
    if n != 0:
        raise ParamError(f"-w {n} (Hardware.num_worker_train) is not implemented: decode-var simulates every batch "
                         "in the training process, seeded by (VAR.seed, epoch, step), so that a run and its resume "
                         "are bit for bit the same; simulation in DataLoader workers is not built. Leave out -w "
                         "(or pass -w 0).")


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--minutes must be a number of minutes > 0, got {text!r}")
    return value


def apply_flags(param, debug: bool, num_worker_override: Optional[int]):
    """``-d`` (a small data set) and ``-w`` on the param; returns it."""
    if debug:
        param.HyperParameter.pseudo_ds_size = min(param.HyperParameter.pseudo_ds_size, 256)
        param.TestSet.test_size = min(param.TestSet.test_size, 64)
    if num_worker_override is not None:
        check_num_workers(num_worker_override)
        param.Hardware.num_worker_train = num_worker_override
    return param


def training_device(device: str) -> str:
    """The device to train on: ``device``, or the CPU (with a warning, as DECODE does) for CUDA on a machine
    without; an unknown name, a GPU index past this machine's or MPS without an Apple GPU is a DeviceError."""
    flag = "-i/--device (or Hardware.device)"
    if parse_device(device, flag).type == "cuda" and not torch.cuda.is_available():
        warn(f"{device} is not available here; training on the CPU.")
        return "cpu"
    check_device(device, flag)
    return device


def _train(param_file, device, debug, no_log, num_worker_override, log_folder, log_comment, trust_pickle, progress,
           overrides, minutes=None):
    param_file = Path(param_file)
    param = apply_flags(load_param(param_file, overrides=overrides), debug, num_worker_override)
    device = training_device(device or param.Hardware.device)
    torch.set_num_threads(int(param.Hardware.torch_threads))
    if param.Hardware.device_simulation != "cpu" and device == "cpu":
        param.Hardware.device_simulation = "cpu"
    ctx = None
    if distributed.launched_distributed():
        timeout = getattr(param.VAR.train, "ddp_timeout", distributed.DEFAULT_TIMEOUT_S)
        ctx, device = distributed.init_from_env(device, timeout)
    is_main = ctx is None or ctx.is_main
    if param.Hardware.num_worker_train and is_main:  # DECODE's param files carry 4: accepted, said to do nothing
        warn(f"Hardware.num_worker_train = {param.Hardware.num_worker_train} is ignored: batches are simulated in "
             "the training process (see decode_var.train.check_num_workers).")
    # files are read and written by rank 0 alone; its result (or error) reaches every rank
    on_main = ctx.run_on_main if ctx is not None else (lambda fn: fn())
    exp_parent, key = experiment_parent(param)
    on_main(lambda: check_output_folder(exp_parent, flag=key))  # before any model is built or loaded
    state = on_main(lambda: load_checkpoint(param.InOut.checkpoint_init)) if param.InOut.checkpoint_init else None
    # build every part before the experiment folder exists: a bad param leaves nothing behind
    trainer = Trainer(param, None, device=device, log=True, progress=progress, dist=ctx)
    n_parameters = sum(p.numel() for p in trainer.model.parameters())
    on_main(lambda: check_output_folder(exp_parent, BYTES_PER_PARAMETER * n_parameters + RUN_EXTRA_BYTES, key))
    if state is None and param.InOut.model_init:
        def init_weights():  # in a distributed run DDP copies rank 0's weights to the other ranks
            load_model_weights(trainer.model, param.InOut.model_init, trusted=trust_pickle)

        on_main(init_weights)
    exp, resuming = on_main(lambda: setup_experiment(param_file, param, debug, log_comment))
    trainer.exp_dir = exp
    if not no_log and is_main:
        trainer.open_tensorboard(Path(log_folder) / exp.name)
    if state is not None:
        trainer.load_state_dict(state)
        if is_main:
            note(f"resuming {exp} at epoch {trainer.epoch}"
                 + (f", step {trainer._partial['step']}" if trainer._partial else ""))
    if progress and is_main:
        where = f"  ranks {ctx.world_size} ({ctx.backend}), global batch " \
                f"{param.HyperParameter.batch_size * ctx.world_size}" if ctx is not None else ""
        note(f"experiment {exp}  backend {trainer.backend.name}  model {param.HyperParameter.architecture}  "
             f"loss {param.HyperParameter.loss_impl}  device {device}{where}")
    try:
        trainer.fit(minutes=minutes)
    except RuntimeError as err:
        if ctx is not None and not isinstance(err, DecodeVarError) and distributed.is_comm_error(err):
            raise ctx.lost_contact(err, exp) from err
        raise
    finally:
        # the DDP wrapper holds the process group: drop it before the group is destroyed, or gloo's
        # threads outlive it and abort the process at exit
        trainer.release_ddp()
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 done, 2 user error (message names the fix), 3 diverged, 130 stopped by a signal."""
    args = parse_args(argv)
    try:
        overrides = {"InOut": {"checkpoint_init": args.resume}} if args.resume else None
        train(args.param_file, args.device, args.debug, args.no_log, args.num_worker_override, args.log_folder,
              args.log_comment, args.trust_pickle, progress=not args.no_progress, overrides=overrides,
              minutes=args.minutes)
    except TrainingInterrupted as err:
        print(f"decode-var-train: {err}.", file=sys.stderr)
        print(_resume_hint(args, err), file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"decode-var-train: {err}", file=sys.stderr)
        return 3
    except (DecodeVarError, OSError) as err:  # an OSError a write did not name (atomic writes do)
        return exit_status("decode-var-train", err)
    except KeyboardInterrupt as err:  # before training started: nothing to save
        print(f"decode-var-train: {err or 'interrupted before training started'}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(args, err) -> str:
    """The exact command that resumes the interrupted run (same program, flags and device)."""
    exp = getattr(err, "exp_dir", None)
    if exp is None:
        return "Resume with:\n  decode-var-train -p <experiment>/param_run.yaml --resume <experiment>/ckpt.pt"
    exp = Path(os.path.abspath(exp))
    ckpt = exp / "ckpt.pt"
    if not ckpt.is_file():
        return f"No checkpoint was written before the stop ({exp} has no ckpt.pt): start the run again."
    main_file = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    note = ""
    if world > 1:  # launched by torchrun: resume the same way, every rank loads the same checkpoint
        nnodes = max(world // max(local, 1), 1)
        prog = ["torchrun"] + ([f"--nnodes={nnodes}"] if nnodes > 1 else []) + [f"--nproc_per_node={local}", "-m",
                                                                                 "decode_var.train"]
        if nnodes > 1:
            note = ("\n(on every machine, with the --node_rank / --master_addr or --rdzv_* flags of the first run;"
                    " only rank 0's machine reads the checkpoint and sends it to the others)")
    elif main_file.name == "train.py" and main_file.parent.name == "decode_var":  # python -m decode_var.train
        prog = [sys.executable, "-m", "decode_var.train"]
    else:
        prog = ["decode-var-train"]
    param_run = exp / ("param_run" + Path(args.param_file).suffix)
    cmd = prog + ["-p", str(param_run), "--resume", str(ckpt)]
    if args.device:
        cmd += ["-i", args.device]
    if args.num_worker_override is not None:
        cmd += ["-w", str(args.num_worker_override)]
    if args.no_log:
        cmd.append("-n")
    if args.log_folder != "runs":
        cmd += ["-l", args.log_folder]
    if args.no_progress:
        cmd.append("--no-progress")
    return "Resume with:\n  " + shlex.join(cmd) + note


if __name__ == "__main__":
    sys.exit(main())
