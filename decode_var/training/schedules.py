"""Learning-rate schedules and gradient clipping, per epoch, from ``HyperParameter`` and ``VAR.train``.

(The teacher-forcing schedule belongs to the model, :meth:`decode_var.nn.model.VARMultiScale.set_epoch`;
the scale-weight schedules to the loss, :mod:`decode_var.nn.progressive`.)
"""
from __future__ import annotations

import math
import time

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


def build_lr_scheduler(param, optimizer):
    """``HyperParameter.learning_rate_scheduler``: cosine (with ``VAR.train.warmup_epochs``), StepLR or
    ReduceLROnPlateau, with ``learning_rate_scheduler_param``."""
    hp = param.HyperParameter
    kw = hp.learning_rate_scheduler_param.to_dict() if hasattr(hp.learning_rate_scheduler_param, "to_dict") else {}
    if hp.learning_rate_scheduler == "cosine":
        return WarmupCosine(optimizer, hp.epochs, param.VAR.train.warmup_epochs, **kw)
    if hp.learning_rate_scheduler == "StepLR":
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
