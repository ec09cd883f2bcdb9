"""Learning-rate schedules and gradient clipping, per epoch, from ``HyperParameter`` and ``VAR.train``.

(The teacher-forcing schedule belongs to the model, :meth:`decode_var.nn.model.VARMultiScale.set_epoch`;
the scale-weight schedules to the loss, :mod:`decode_var.nn.progressive`.)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

#: the max-norm DECODE's ``train_val_impl.train`` clips to when ``HyperParameter.grad_mod`` is true
DECODE_GRAD_MOD_NORM = 0.03


class WarmupCosine:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to ``min_factor`` at ``epochs`` (per epoch)."""

    def __init__(self, optimizer, epochs: int, warmup_epochs: int = 0, min_factor: float = 0.01):
        self.optimizer, self.epochs, self.warmup, self.min_factor = optimizer, max(int(epochs), 1), warmup_epochs, min_factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def factor(self, epoch: int) -> float:
        if self.warmup and epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        t = min(max(epoch - self.warmup, 0) / max(self.epochs - self.warmup, 1), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self):
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * self.factor(self.last_epoch)

    def step(self, *_):
        self.last_epoch += 1
        self._apply()

    def set_epochs(self, epochs: int) -> None:
        """Stretch or shrink the decay to end at ``epochs`` (a time budget's plan, :class:`TimeBudget`); the
        current epoch's learning rate is recomputed."""
        self.epochs = max(int(epochs), 1)
        self._apply()

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        # the length of the decay is the param's (a resume may extend a run) or a time budget's plan, which
        # the trainer keeps and sets again (set_epochs)
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def build_lr_scheduler(settings: "TrainSettings", optimizer):
    """``HyperParameter.learning_rate_scheduler``: cosine (with ``VAR.train.warmup_epochs``), StepLR or
    ReduceLROnPlateau, with ``learning_rate_scheduler_param``."""
    kw = dict(settings.scheduler_param)
    if settings.scheduler == "cosine":
        return WarmupCosine(optimizer, settings.epochs, settings.warmup_epochs, **kw)
    if settings.scheduler == "StepLR":
        kw.setdefault("step_size", 10)
        return torch.optim.lr_scheduler.StepLR(optimizer, **kw)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)


def step_lr_scheduler(scheduler, test_loss: float, train_loss: float) -> None:
    """One epoch step; ReduceLROnPlateau reads the test loss (the train loss when there is none)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(test_loss if math.isfinite(test_loss) else train_loss)
    else:
        scheduler.step()


def grad_clip_norm(param) -> float:
    """Max gradient norm of a step: DECODE's 0.03 when ``HyperParameter.grad_mod`` is true (DECODE's
    flag, as its training loop reads it), else ``VAR.train.grad_clip`` (0 = no clipping)."""
    if param.HyperParameter.get("grad_mod") is True:
        return DECODE_GRAD_MOD_NORM
    clip = param.VAR.train.grad_clip
    return clip if clip > 0 else float("inf")


def _plain_dict(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains, parsed once from the param (:meth:`parse`); the trainer reads nothing else of it.

    Attributes:
        seed: ``VAR.seed`` (initial weights, and with epoch and step every draw of training).
        epochs, batch_size, pseudo_ds_size: ``HyperParameter``'s (samples per epoch = ``pseudo_ds_size``).
        optimizer, opt_param: ``HyperParameter.optimizer`` (Adam, AdamW) and its keyword arguments.
        scheduler, scheduler_param, warmup_epochs: ``HyperParameter.learning_rate_scheduler`` (+ ``_param``)
            and ``VAR.train.warmup_epochs`` (:func:`build_lr_scheduler`).
        grad_clip: max gradient norm of a step (:func:`grad_clip_norm`; inf = none).
        max_nonfinite_in_row, eval_every, prefetch, plot: ``VAR.train``'s.
        ema: ``VAR.train.ema``, the decay of the weights' moving average (0: none;
            :class:`~decode_var.training.ema.WeightAverage`).
    """

    seed: int
    epochs: int
    batch_size: int
    pseudo_ds_size: int
    optimizer: str
    opt_param: dict
    scheduler: str
    scheduler_param: dict
    warmup_epochs: int
    grad_clip: float
    max_nonfinite_in_row: int
    eval_every: int
    prefetch: object
    plot: bool
    ema: float = 0.0

    @classmethod
    def parse(cls, param) -> "TrainSettings":
        hp, train = param.HyperParameter, param.VAR.train
        return cls(seed=param.VAR.seed, epochs=hp.epochs, batch_size=hp.batch_size, pseudo_ds_size=hp.pseudo_ds_size,
                   optimizer=hp.optimizer, opt_param=_plain_dict(hp.opt_param), scheduler=hp.learning_rate_scheduler,
                   scheduler_param=_plain_dict(hp.learning_rate_scheduler_param), warmup_epochs=train.warmup_epochs,
                   grad_clip=grad_clip_norm(param), max_nonfinite_in_row=train.max_nonfinite_in_row,
                   eval_every=train.eval_every, prefetch=train.prefetch, plot=bool(train.plot),
                   ema=float(train.ema or 0.0))


class TimeBudget:
    """Training for a wall-clock budget (``decode-var-train --minutes N``): the number of epochs, and with
    it the length of the cosine decay, from the time the first epochs take.

    The clock starts when the budget is made (the start of :meth:`Trainer.fit`): start-up, the test set
    and every epoch's evaluation count. After the first epoch of a run, :meth:`plan` returns how many
    epochs in all fit the budget at the mean time per epoch so far (at least the epochs done); after
    later epochs, :meth:`fits_another` says whether one more epoch still fits, so that a run whose epochs
    slow down stops in time (with its model saved) rather than overrun.

    Args:
        minutes: the budget, wall-clock minutes (> 0).
        clock: seconds, monotonic (``time.monotonic``; tests pass a fake one).
    """

    def __init__(self, minutes: float, clock=None):
        if not minutes or minutes <= 0:
            raise ValueError(f"a time budget must be > 0 minutes, got {minutes!r}")
        self.seconds = 60.0 * float(minutes)
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.epochs_run = 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def epoch_done(self) -> None:
        self.epochs_run += 1

    def mean_epoch(self) -> float:
        return self.elapsed() / max(self.epochs_run, 1)

    def plan(self, epochs_done: int) -> int:
        """Epochs in all (``epochs_done`` of them already trained) that fit the budget."""
        more = int((self.seconds - self.elapsed()) // self.mean_epoch())
        return max(epochs_done + max(more, 0), max(epochs_done, 1))

    def fits_another(self) -> bool:
        return self.elapsed() + self.mean_epoch() <= self.seconds
