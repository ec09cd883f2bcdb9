"""Multi-GPU and multi-node training with PyTorch's own engine: torchrun + DistributedDataParallel.

One machine, N GPUs::

    torchrun --nproc_per_node=N -m decode_var.train -p param.yaml

M machines with N GPUs each: the same command on every machine, with ``--node_rank`` 0 .. M-1
(machine 0 runs rank 0, which writes the experiment folder)::

    torchrun --nnodes=M --node_rank=K --nproc_per_node=N --master_addr=MACHINE_0 --master_port=29500 \\
        -m decode_var.train -p param.yaml

(or torchrun's rendezvous: ``--rdzv_backend=c10d --rdzv_endpoint=MACHINE_0:29500 --rdzv_id=JOB``
instead of ``--node_rank/--master_*``; rank 0 may then run on any of the machines).

What changes when ``WORLD_SIZE > 1`` (set by torchrun); a plain ``python -m decode_var.train`` is
the unchanged single-process path:

- ``HyperParameter.batch_size`` is the batch of *one* rank (one GPU); the global batch is
  ``batch_size * world_size``. An epoch keeps ``pseudo_ds_size`` samples: it has
  ``pseudo_ds_size // (batch_size * world_size)`` steps.
- Every sample of the global batch of (epoch, step) has its own seed; rank ``r`` simulates
  samples ``r * batch_size .. (r + 1) * batch_size - 1``. No rank repeats another's samples, and
  the global batch does not depend on how it is split: 2 ranks x 8 train on the samples of
  1 x 16 (:meth:`DistContext` with ``world_size=1`` gives that single-process reference).
- DDP averages the gradients; the loss is a per-sample mean, so the step equals the step on the
  global batch. Teacher-forcing coins and dropout use rank-offset seeds.
- The per-epoch loss statistics are all-reduced before the adaptive channel weights are updated,
  and the test loss and metrics are rank 0's on every rank, so channel weights, progressive stage
  and learning rate stay identical on all ranks. Skipping a non-finite batch and stopping on a
  signal are agreed by all ranks at the same step.
- Rank 0 alone creates the experiment folder, logs, plots and writes checkpoints (atomically).
  On resume rank 0 reads ``ckpt.pt`` and sends it to every rank (no shared file system needed).
- A rank that dies or hangs makes the others stop with :class:`DistributedError` after at most
  ``VAR.train.ddp_timeout`` seconds (a dead process is noticed at once), never a hang.
- Backend: NCCL for CUDA devices (rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``), gloo on CPUs.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from decode_var.core.errors import DecodeVarError, ParamError
from decode_var.core.seeds import derive_seed

#: Default of ``VAR.train.ddp_timeout``: seconds a rank waits for the others in a collective.
DEFAULT_TIMEOUT_S = 300.0

# the context of this process and whether init_from_env created the process group (then it also ends it)
_current: Optional["DistContext"] = None
_owned = False


class DistributedError(DecodeVarError, RuntimeError):
    """A rank lost contact with the others (one crashed, was killed, hung, or the network failed)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run.

    ``backend=None`` means no process group: every collective is the identity. With
    ``world_size=1`` that is the single-process reference of the distributed data path
    (per-sample seeds), used to check that N ranks give the weights of one process.

    Args:
        rank: global rank, 0 .. world_size - 1. local_rank: rank on this machine.
        world_size: number of processes. backend: ``'nccl'``, ``'gloo'`` or None.
        timeout_s: collective timeout, for messages.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group with more than one rank exists: collectives communicate."""
        return self.backend is not None and self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live (NCCL needs them on this rank's GPU)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ seeds
    @property
    def rank_tag(self) -> str:
        """Prefix of this rank's warnings ('' without a process group)."""
        return f"rank {self.rank}: " if self.active else ""

    def step_seed(self, seed: int, epoch: int, step: int) -> int:
        """Seed of the global torch RNG in a step (teacher-forcing coins, dropout), rank-offset."""
        return derive_seed(seed, epoch, step, 1, self.rank)

    def data_seed(self, seed: int, epoch: int, step: int, batch_size: int) -> list[int]:
        """One seed per sample of this rank's slice of the global batch: sample i of (epoch, step) is
        the same whichever rank simulates it."""
        return [derive_seed(seed, epoch, step, 2, i) for i in sample_indices(self.rank, batch_size)]

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max over the ranks, in float64; the same list on every rank."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.cpu().tolist()

    def any(self, *flags: bool) -> list[bool]:
        """Per flag: True on every rank when it is True on any rank (one collective for all flags)."""
        return [v > 0 for v in self.all_reduce([float(bool(f)) for f in flags], op="max")]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled; only for objects this program made)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and return its result on every rank.

        An exception of rank 0 is raised on every rank, so a bad checkpoint or an existing
        experiment folder stops all ranks with rank 0's message instead of leaving them waiting.
        """
        if not self.active:
            return fn()
        result, error, sent = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # sent to the other ranks, then raised here too
                error = sent = err
                try:
                    pickle.dumps(err)
                except Exception:  # the others must not wait for an object that cannot be sent
                    sent = DecodeVarError(f"rank 0: {type(err).__name__}: {err}")
        error_all, result = self.broadcast((sent, None if error is not None else result))
        if error is not None:
            raise error
        if error_all is not None:
            raise error_all
        return result

    def lost_contact(self, err: BaseException, exp_dir=None) -> DistributedError:
        """The error to raise when a collective failed: what happened and how to go on."""
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        where = f"{exp_dir}/ckpt.pt" if exp_dir is not None else "ckpt.pt of the experiment"
        return DistributedError(
            f"rank {self.rank} of {self.world_size} lost contact with the other ranks ({detail}). Another rank "
            f"stopped (it crashed, was killed or ran out of memory: see its own message) or the network between "
            f"the machines failed; no rank waits longer than VAR.train.ddp_timeout = {self.timeout_s:g} s. The last "
            f"checkpoint {where} is complete (rank 0 writes it atomically): resume by starting the same torchrun "
            f"command with --resume {where}.")


class SingleProcess(DistContext):
    """The plain single-process run: one seed per batch, collectives are the identity.

    The trainer talks to this and to :class:`DistContext` through the same methods, so its step
    code has no single-process branches. (``DistContext()`` with ``world_size=1`` is the
    single-process reference of the *distributed* data path, with per-sample seeds; this is not.)
    """

    def step_seed(self, seed: int, epoch: int, step: int) -> int:
        return derive_seed(seed, epoch, step, 1)

    def data_seed(self, seed: int, epoch: int, step: int, batch_size: int) -> int:
        return derive_seed(seed, epoch, step, 2)


# ---------------------------------------------------------------------- setup
def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_distributed() -> bool:
    """True when started by torchrun (or an equivalent launcher) with more than one process."""
    return world_size_from_env() > 1


def choose_backend(device: str) -> str:
    """NCCL for CUDA devices when PyTorch has it, gloo otherwise (CPUs)."""
    if str(device).startswith("cuda") and torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, str]:
    """Join the process group torchrun describes in the environment; returns (context, this rank's device).

    A CUDA device becomes ``cuda:LOCAL_RANK``: one GPU per process.
    """
    if not dist.is_available():
        raise DecodeVarError("this PyTorch build has no torch.distributed; install a standard PyTorch build "
                             "or train in one process (without torchrun).")
    timeout_s = float(timeout_s)
    if not timeout_s > 0:
        raise ParamError(f"VAR.train.ddp_timeout = {timeout_s!r} must be a number of seconds > 0.")
    rank, world = int(os.environ["RANK"]), world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = choose_backend(device)
    if backend == "nccl":
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise ParamError(f"rank {rank} has LOCAL_RANK {local_rank} but this machine has {n_gpu} GPU(s): start "
                             f"at most {n_gpu} processes per machine (torchrun --nproc_per_node={n_gpu}).")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif str(device).startswith("cuda"):
        device = "cpu"
    global _current, _owned
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            _owned = True
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"rank {rank} of {world} could not join the process group at "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within {timeout_s:g} s "
                f"({str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__}). Start the "
                "same torchrun command on every machine, with the address of the first machine in --rdzv_endpoint "
                "(or --master_addr / --master_port), and check that the port is open between them.") from None
    else:  # a process group made by the caller: use it, leave it to the caller
        backend = dist.get_backend()
    _current = DistContext(rank, world, local_rank, backend, timeout_s)
    return _current, device


def current() -> Optional[DistContext]:
    """The context :func:`init_from_env` made in this process, or None."""
    return _current


def shutdown_owned() -> None:
    """Leave the process group if :func:`init_from_env` made it (every rank, at the end or after an error)."""
    global _current, _owned
    if _owned and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # after a lost peer there may be nothing left to destroy cleanly
            pass
    _current, _owned = None, False


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP wrapper of ``model`` (its parameters are rank 0's from here on); the model itself is unchanged.

    ``find_unused_parameters``: the progressive schedule computes only the active scales and teacher
    forcing can skip the conditioning path, so a step need not use every parameter.
    """
    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def is_comm_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the communication layer (a lost or hung peer), not from the computation."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    if not isinstance(err, RuntimeError):
        return False
    msg = str(err)
    return any(s in msg for s in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset",
                                  "Broken pipe", "timed out", "Timed out", "ProcessGroup", "TCPStore"))


def sample_indices(rank: int, batch_size: int) -> range:
    """Indices, in the global batch, of the samples that ``rank`` simulates."""
    return range(rank * batch_size, (rank + 1) * batch_size)
