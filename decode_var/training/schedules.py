"""Learning-rate schedules and gradient clipping, per epoch, from ``HyperParameter`` and ``VAR.train``.

(The teacher-forcing schedule belongs to the model, :meth:`decode_var.nn.model.VARMultiScale.set_epoch`;
the scale-weight schedules to the loss, :mod:`decode_var.nn.progressive`.)
"""
from __future__ import annotations

import math

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

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
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
