"""Channel weights of the 6-channel loss ``[p, phot, x, y, z, bg]``: presets and the adaptive rule.

Static weights are a list of 6 non-negative numbers or a preset name (:data:`PRESETS`).

The adaptive rule (published with the VAR emitter work) raises the weight of channels whose loss
has stopped falling and lowers the weight of channels that fall fast. Every ``interval`` epochs,
per channel::

    ratio = mean(last `window` epoch losses) / mean(the `window` epoch losses before those)
    ratio > up_ratio   (0.95): weight *= up   (1.1)    # slow channel: push it
    ratio < down_ratio (0.8):  weight *= down (0.9)    # fast channel: let the others catch up

What the published rule lacks, added here:

- bounds: every weight stays in ``[weight_min, weight_max]``;
- ``renormalise``: after each update the weights are rescaled (respecting the bounds) so their sum
  stays the sum of the initial weights, so the overall loss scale does not drift with the weights;
- non-finite epoch losses are dropped from the history (counted in ``ignored``), never averaged in;
  the windows are taken over the finite values. A window whose earlier mean is not > 0 carries no
  information and leaves that weight unchanged;
- a channel whose initial weight is 0 is switched off and stays at 0 (no bounds, no rescaling);
- :meth:`AdaptiveChannelWeights.state_dict` / :meth:`~AdaptiveChannelWeights.load_state_dict` hold
  plain python values (``torch.load(weights_only=True)`` safe), so a resumed run continues exactly;
- :meth:`~AdaptiveChannelWeights.update` returns the weights after every epoch, for the log.

The history holds each channel's *own* loss (without its channel weight): otherwise raising a
weight would raise the next ratio and feed back on itself. :class:`decode_var.nn.loss.AdaptivePPXYZBLoss`
divides the weighted components it logs by the weights in effect before passing them on.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Mapping, Sequence

from decode_var.core.errors import CheckpointError, ParamError
from decode_var.core.channels import CHANNELS

logger = logging.getLogger(__name__)

#: Channel order of the 6-channel output, target and weight tensors.

#: Named static channel weights, in :data:`CHANNELS` order.
PRESETS = {
    "balanced": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "detection_focused": (2.0, 1.0, 1.0, 1.0, 0.5, 0.5),
    "localization_focused": (1.0, 1.0, 2.0, 2.0, 2.0, 0.5),
    "photometry_focused": (1.0, 2.0, 1.0, 1.0, 1.0, 1.0),
    "recommended": (1.5, 1.0, 1.2, 1.2, 0.8, 0.8),
}

_KEY = "VAR.loss.channel_weights"


def resolve_channel_weights(spec: str | Sequence[float]) -> list[float]:
    """Six channel weights from a preset name or a sequence of 6 finite numbers >= 0 (not all 0)."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ParamError(f"{_KEY} = {spec!r} is not a preset. Presets: "
                             + ", ".join(f"{k} {list(v)}" for k, v in PRESETS.items())
                             + "; or give a list of 6 numbers in the order [p, phot, x, y, z, bg].")
        return list(PRESETS[spec])
    try:
        values = list(spec)
    except TypeError:
        values = None
    if values is None or len(values) != 6:
        raise ParamError(f"{_KEY} = {spec!r} must be a preset name ({', '.join(PRESETS)}) or a list of 6 numbers "
                         f"in the order [p, phot, x, y, z, bg].")
    out = []
    for ch, v in zip(CHANNELS, values):
        v = _as_float(v)
        if v is None or not math.isfinite(v) or v < 0:
            raise ParamError(f"{_KEY}: the weight of channel {ch} is {v!r}; every weight must be a finite number >= 0.")
        out.append(v)
    if not any(out):
        raise ParamError(f"{_KEY} is all zeros: at least one channel needs a weight > 0.")
    return out


class AdaptiveChannelWeights:
    """The adaptive channel-weight rule with bounds, renormalisation and resumable state.

    Args:
        initial: 6 starting weights (preset name or list); channels at 0 stay switched off.
        interval: apply the rule after every ``interval``-th recorded epoch.
        window: epochs per compared window (needs ``2 * window`` finite values per channel).
        up_ratio: ratio above which a weight is multiplied by ``up``.
        down_ratio: ratio below which a weight is multiplied by ``down``.
        up: factor >= 1 for slow channels.
        down: factor in (0, 1] for fast channels.
        weight_min, weight_max: bounds on every active weight.
        renormalise: keep the sum of the weights at the sum of the initial weights.
        enabled: False records history and reports, but never changes a weight.
    """

    def __init__(self, initial: str | Sequence[float] = "recommended", interval: int = 10, window: int = 5,
                 up_ratio: float = 0.95, down_ratio: float = 0.8, up: float = 1.1, down: float = 0.9,
                 weight_min: float = 0.1, weight_max: float = 5.0, renormalise: bool = True, enabled: bool = True):
        self.interval = _check_int("adaptive_interval", interval)
        self.window = _check_int("adaptive_window", window)
        self.up_ratio = _check_float("adaptive_up_ratio", up_ratio, low=0.0, low_open=True)
        self.down_ratio = _check_float("adaptive_down_ratio", down_ratio, low=0.0, low_open=True)
        if self.down_ratio > self.up_ratio:
            raise ParamError(f"VAR.loss.adaptive_down_ratio ({down_ratio}) must not exceed "
                             f"VAR.loss.adaptive_up_ratio ({up_ratio}).")
        self.up = _check_float("adaptive_up", up, low=1.0)
        self.down = _check_float("adaptive_down", down, low=0.0, low_open=True)
        if self.down > 1:
            raise ParamError(f"VAR.loss.adaptive_down = {down!r} must be in (0, 1].")
        self.weight_min = _check_float("weight_min", weight_min, low=0.0)
        self.weight_max = _check_float("weight_max", weight_max, low=0.0, low_open=True)
        if self.weight_min > self.weight_max:
            raise ParamError(f"VAR.loss.weight_min ({weight_min}) must not exceed VAR.loss.weight_max ({weight_max}).")
        self.renormalise = _check_bool("renormalise", renormalise)
        self.enabled = _check_bool("adaptive", enabled)

        self.initial = resolve_channel_weights(initial)
        for ch, w in zip(CHANNELS, self.initial):
            if w > 0 and not self.weight_min <= w <= self.weight_max:
                raise ParamError(f"{_KEY}: the weight of channel {ch} ({w}) lies outside "
                                 f"[VAR.loss.weight_min, VAR.loss.weight_max] = [{weight_min}, {weight_max}]; "
                                 "widen the bounds or change the weight.")
        self.weights: list[float] = list(self.initial)
        self.history: list[list[float]] = [[] for _ in CHANNELS]
        self.ignored = [0] * len(CHANNELS)
        self.epoch = 0  # epochs recorded so far
        self.n_updates = 0  # rule applications that changed at least one weight

    # ------------------------------------------------------------------ the rule
    def update(self, channel_losses: Mapping[str, float] | Sequence[float]) -> dict:
        """Record one epoch's per-channel loss (without channel weights) and apply the rule if due.

        Args:
            channel_losses: mapping with keys ``p, phot, x, y, z, bg`` or a sequence of 6 values.
                Missing or non-finite values are ignored.

        Returns:
            ``{'chw_p': ..., ..., 'chw_bg': ..., 'chw_changed': 0.0 or 1.0}``: the weights now in effect.
        """
        values = _channel_values(channel_losses)
        for c, v in enumerate(values):
            if v is not None and math.isfinite(v):
                self.history[c].append(v)
            else:
                self.ignored[c] += 1
        self.epoch += 1
        changed = False
        if self.enabled and self.epoch % self.interval == 0:
            changed = self._apply_rule()
        report = self.report()
        report["chw_changed"] = float(changed)
        if changed:
            logger.info("adaptive channel weights after epoch %d: %s", self.epoch,
                        ", ".join(f"{ch}={w:.4g}" for ch, w in zip(CHANNELS, self.weights)))
        return report

    def ratios(self) -> list[float | None]:
        """Per channel: mean of the last window over the window before, or None when undefined."""
        out: list[float | None] = []
        n = self.window
        for h in self.history:
            if len(h) < 2 * n:
                out.append(None)
                continue
            last, prev = math.fsum(h[-n:]) / n, math.fsum(h[-2 * n:-n]) / n
            out.append(last / prev if prev > 0 and math.isfinite(last / prev) else None)
        return out

    def _apply_rule(self) -> bool:
        new = list(self.weights)
        for c, ratio in enumerate(self.ratios()):
            if self.initial[c] == 0 or ratio is None:
                continue
            if ratio > self.up_ratio:
                new[c] *= self.up
            elif ratio < self.down_ratio:
                new[c] *= self.down
        new = [min(max(w, self.weight_min), self.weight_max) if self.initial[c] > 0 else 0.0
               for c, w in enumerate(new)]
        if self.renormalise:
            new = self._renormalised(new)
        changed = new != self.weights
        self.weights = new
        self.n_updates += int(changed)
        return changed

    def _renormalised(self, w: list[float]) -> list[float]:
        """Rescale the active weights so they sum to the initial sum, each kept inside the bounds.

        Finds c with sum(clamp(c * w_i)) = target; the sum is monotone in c, so bisection is exact to
        float precision. If the bounds cannot reach the target the weights end on the bounds.
        """
        active = [i for i in range(len(w)) if self.initial[i] > 0]
        target = math.fsum(self.initial[i] for i in active)
        lo, hi = self.weight_min, self.weight_max

        def total(c: float) -> float:
            return math.fsum(min(max(c * w[i], lo), hi) for i in active)

        def scaled(c: float) -> list[float]:
            out = list(w)
            for i in active:
                out[i] = min(max(c * w[i], lo), hi)
            return out

        s = math.fsum(w[i] for i in active)
        c = target / max(s, 1e-4)
        if all(lo <= c * w[i] <= hi for i in active):
            return scaled(c)
        c_lo, c_hi = 0.0, max(hi / max(min(w[i] for i in active), 1e-4), c)
        for _ in range(200):
            mid = 0.5 * (c_lo + c_hi)
            if total(mid) < target:
                c_lo = mid
            else:
                c_hi = mid
        return scaled(c_hi)

    # ------------------------------------------------------------------ reporting and state
    def report(self) -> dict:
        """The weights in effect, ``{'chw_p': ..., ..., 'chw_bg': ...}``."""
        return {f"chw_{ch}": float(w) for ch, w in zip(CHANNELS, self.weights)}

    def config(self) -> dict:
        return {"interval": self.interval, "window": self.window, "up_ratio": self.up_ratio,
                "down_ratio": self.down_ratio, "up": self.up, "down": self.down, "weight_min": self.weight_min,
                "weight_max": self.weight_max, "renormalise": self.renormalise, "enabled": self.enabled}

    def state_dict(self) -> dict:
        """Plain python state: weights, history, epoch counter and the rule's settings."""
        return {"weights": list(self.weights), "initial": list(self.initial),
                "history": [list(h) for h in self.history], "ignored": list(self.ignored),
                "epoch": self.epoch, "n_updates": self.n_updates, "config": self.config()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output. The rule's settings stay those of this object."""
        try:
            weights = [float(v) for v in state["weights"]]
            history = [[float(v) for v in h] for h in state["history"]]
            ignored = [int(v) for v in state.get("ignored", [0] * len(CHANNELS))]
            epoch, n_updates = int(state["epoch"]), int(state.get("n_updates", 0))
            initial = [float(v) for v in state.get("initial", self.initial)]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"adaptive channel-weight state is malformed ({type(err).__name__}: {err}); "
                                  "the checkpoint is corrupt or from another loss.") from err
        if len(weights) != 6 or len(history) != 6 or len(ignored) != 6 or len(initial) != 6:
            raise CheckpointError("adaptive channel-weight state must hold 6 channels; the checkpoint is from "
                                  "another loss.")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not all(math.isfinite(v) for h in history for v in h):
            raise CheckpointError("adaptive channel-weight state holds negative or non-finite values; "
                                  "the checkpoint is corrupt.")
        if initial != self.initial:
            logger.warning("channel weights in the checkpoint started from %s, the param file now gives %s; "
                           "continuing from the checkpoint's weights.", initial, self.initial)
        saved = state.get("config")
        if isinstance(saved, Mapping) and dict(saved) != self.config():
            logger.warning("adaptive channel-weight settings changed since the checkpoint (%s -> %s); "
                           "the new settings apply from now on.", dict(saved), self.config())
        self.weights, self.history, self.ignored = weights, history, ignored
        self.initial = initial
        self.epoch, self.n_updates = epoch, n_updates

    def __repr__(self) -> str:
        w = ", ".join(f"{ch}={v:.3g}" for ch, v in zip(CHANNELS, self.weights))
        return f"AdaptiveChannelWeights({w}; epoch={self.epoch}, interval={self.interval}, window={self.window})"


def _channel_values(channel_losses) -> list[float | None]:
    if isinstance(channel_losses, Mapping):
        return [_as_float(channel_losses.get(ch)) for ch in CHANNELS]
    values = list(channel_losses)
    if len(values) != 6:
        raise ValueError(f"expected 6 channel losses [p, phot, x, y, z, bg], got {len(values)}")
    return [_as_float(v) for v in values]


def _as_float(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)  # python / numpy numbers and 0-d tensors
    except (TypeError, ValueError):
        return None


def _check_int(key: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ParamError(f"VAR.loss.{key} = {v!r} must be an integer >= 1.")
    return int(v)


def _check_float(key: str, v, low: float, low_open: bool = False) -> float:
    f = None if isinstance(v, bool) or not isinstance(v, numbers.Real) else float(v)
    if f is None or not math.isfinite(f) or (f <= low if low_open else f < low):
        raise ParamError(f"VAR.loss.{key} = {v!r} must be a finite number {'>' if low_open else '>='} {low:g}.")
    return f


def _check_bool(key: str, v) -> bool:
    if not isinstance(v, bool):
        raise ParamError(f"VAR.loss.{key} = {v!r} must be true or false.")
    return v
