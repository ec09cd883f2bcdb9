"""An exponential moving average of a model's weights, for evaluation and the saved model (``VAR.train.ema``).

After every optimiser step the average moves toward the weights: ``avg = d * avg + (1 - d) * w``, with
``d = min(decay, (1 + t) / (10 + t))`` at step ``t`` (the usual warm-up: early steps are not frozen in by a
decay meant for thousands of steps). The trainer evaluates and saves ``model.pt`` with the average in place
(:meth:`WeightAverage.applied`) and trains on the raw weights; the checkpoint holds both, so a resumed run
goes on exactly. Averaged: the floating-point parameters and buffers, except buffers set after training
(:data:`NOT_AVERAGED`: the post-hoc sigma factors).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["WeightAverage", "NOT_AVERAGED"]

#: state-dict entries (by last name) that are not averaged: set after training, not by the optimiser
NOT_AVERAGED = ("sigma_scale",)


class WeightAverage:
    """The moving average of ``model``'s weights (see the module docstring).

    Args:
        model: the trained module (its state dict's floating-point entries are averaged).
        decay: the decay per step, in (0, 1); the average spans about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"VAR.train.ema = {decay!r}: give a decay in (0, 1), e.g. 0.995, or 0 for none.")
        self.decay = float(decay)
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in self._averaged(model).items()}

    @staticmethod
    def _averaged(model: torch.nn.Module) -> dict:
        return {k: v for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                and k.rsplit(".", 1)[-1] not in NOT_AVERAGED}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step: the average moves toward the model's weights now."""
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for k, v in self._averaged(model).items():
            self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
        self.steps += 1

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """The model with the averaged weights in place; its own weights are back afterwards."""
        live = self._averaged(model)
        kept = {k: v.detach().clone() for k, v in live.items()}
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(kept[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
