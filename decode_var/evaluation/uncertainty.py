"""How honest a model's predicted sigmas are, and their post-hoc calibration.

A model that predicts the standard deviation of each localization (``VAR.model.uncertainty``: the localizations'
``xyz_sig`` in px, px, nm and ``phot_sig`` in photons) is calibrated when 68.27 % of its matched localizations
lie within +-1 sigma of the truth along each axis (a Gaussian's share within one standard deviation).

- :func:`sigma_coverage`: that share per axis, from the matched pairs of a scoring (:meth:`~decode_var.evaluation.
  protocol.Protocol.score`'s ``tp`` and ``tp_match``).
- :func:`sigma_scale`: the factor per axis that makes the share 68.27 %: the 68.27 % quantile of
  ``|error| / sigma``.
- :func:`calibrate_sigma`: fits the factors on held-out simulated sets (their own seeds, not the test set's)
  at both ends of the trained density range, multiplies the model's ``sigma_scale`` by them (applied in eval mode, saved in ``model.pt``) and returns
  the record of the model card (:class:`~decode_var.evaluation.model_card.SigmaCalibration`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.seeds import derive_seed
from decode_var.evaluation.model_card import SigmaCalibration

__all__ = ["ONE_SIGMA", "CALIBRATION_SET", "sigma_coverage", "sigma_scale", "calibrate_sigma"]

#: share of a Gaussian within +-1 standard deviation
ONE_SIGMA = math.erf(1 / math.sqrt(2))
#: second part of the held-out sets' seeds, ``derive_seed(VAR.test_seed, CALIBRATION_SET, k)`` (the test set's is 0)
CALIBRATION_SET = 1


def _z_scores(tp: EmitterSet, tp_match: EmitterSet) -> np.ndarray:
    """(E, 4) |error| / sigma of phot, x, y, z of matched pairs (same units in both sets); nan where no sigma."""
    if tp.xyz_sig is None or len(tp) == 0:
        return np.full((len(tp), 4), np.nan)
    if tp.xy_unit != tp_match.xy_unit:
        raise ValueError(f"tp ({tp.xy_unit}) and tp_match ({tp_match.xy_unit}) must share their xy unit.")
    err_E4 = torch.cat([(tp.phot - tp_match.phot)[:, None], tp.xyz - tp_match.xyz], 1).abs().double().numpy()
    phot_sig = tp.phot_sig if tp.phot_sig is not None else torch.full((len(tp),), float("nan"))
    sig_E4 = torch.cat([phot_sig[:, None], tp.xyz_sig], 1).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return err_E4 / sig_E4


def sigma_coverage(tp: EmitterSet, tp_match: EmitterSet) -> dict:
    """``{"cover_phot", "cover_x", "cover_y", "cover_z"}``: share of the matched localizations ``tp`` within +-1
    predicted sigma of their ground truth ``tp_match`` (nan without sigmas or pairs), and ``n_matched``."""
    z = _z_scores(tp, tp_match)
    out = {}
    for i, ax in enumerate(("phot", "x", "y", "z")):
        ok = np.isfinite(z[:, i])
        out[f"cover_{ax}"] = float((z[ok, i] <= 1).mean()) if ok.any() else float("nan")
    out["n_matched"] = len(tp)
    return out


def sigma_scale(tp: EmitterSet, tp_match: EmitterSet, weight_E: Optional[np.ndarray] = None) -> tuple:
    """(4,) factors on the sigmas of phot, x, y, z that put ``ONE_SIGMA`` of the matched pairs within +-1 sigma:
    the ``ONE_SIGMA`` quantile of |error| / sigma, each pair counted with ``weight_E`` (default 1); 1.0 for an axis
    without a finite, positive one (a 2D model's z is exact: its factor stays 1)."""
    z = _z_scores(tp, tp_match)
    weight_E = np.ones(len(z)) if weight_E is None else np.asarray(weight_E, dtype=np.float64)
    scales = []
    for i in range(4):
        ok = np.isfinite(z[:, i])
        q = _weighted_quantile(z[ok, i], weight_E[ok], ONE_SIGMA) if ok.any() else float("nan")
        scales.append(q if math.isfinite(q) and q > 0 else 1.0)
    return tuple(scales)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value with at least a share ``q`` of the total weight at or below it."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][min(int(np.searchsorted(cum, q * cum[-1])), len(values) - 1)])


def _matched(parts, simulator, n: int, seed: int, batch_size: int):
    """(tp, tp_match) of ``parts.model`` on ``n`` samples of ``simulator`` drawn with ``seed`` (the protocol's
    scoring)."""
    model = parts.model
    batch = simulator.sample(n, seed)
    device = next(model.parameters()).device
    frames = parts.frame_scale(batch.frames_NCHW)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [parts.task.physical_output(frames[i:i + batch_size].to(device)).cpu()
                    for i in range(0, frames.size(0), batch_size)]
    finally:
        model.train(was_training)
    em = parts.task.postprocess(torch.cat(outs, 0))
    if em is None:
        raise ValueError("sigma calibration needs the post-processing (PostProcessing is empty in the param).")
    _, (tp, _, _, tp_match) = parts.protocol.score(parts.backend, parts.matcher, em, parts.protocol.ground_truth(batch))
    return tp, tp_match


def calibrate_sigma(parts, n: Optional[int] = None, epoch: Optional[int] = None,
                    measured_by: str = "decode-var-train", batch_size: int = 64) -> SigmaCalibration:
    """Fit the post-hoc sigma factors of ``parts.model`` (a model with ``sigma_scale``) on held-out simulated sets
    and apply them (``sigma_scale`` is multiplied: calibrating again refines, it does not compound).

    One held-out set per end of the trained density range (``Simulation.emitter_av`` [low, high]; one set for a
    single value: ``parts.density_ends``), seed ``derive_seed(VAR.test_seed, CALIBRATION_SET, k)``; the factors (:func:`sigma_scale`) count
    every set with the same total weight, so that the mean of their shares within +-1 sigma is ``ONE_SIGMA``.
    Sigmas grow less with crowding than the errors do (docs/models.md): a factor fitted on the mix of densities,
    where the dense samples hold most emitters, would leave the sparse end over- and the dense end under-covered;
    weighing the ends alike balances the two.

    Args:
        parts: the run's :class:`~decode_var.training.components.Components` (model, task, backend, frame scale,
            matcher, protocol, and the simulators at the density ends).
        n: samples per held-out set (default ``max(TestSet.test_size, 2048)``: the share within +-1 sigma varies by
            about 0.03 between sets of 512 samples, more than its binomial error, as emitters of a sample share
            their background and neighbours).
        epoch: epochs trained, for the card. measured_by: for the card.

    Returns:
        The card's record, ``scale_*`` the model's ``sigma_scale`` now (write it with
        :func:`~decode_var.evaluation.model_card.update_card`, ``sigma=``); coverages of the held-out sets pooled.
    """
    model = parts.model
    if getattr(model, "sigma_scale", None) is None:
        raise ValueError("this model predicts no sigma (VAR.model.uncertainty: false): nothing to calibrate.")
    n = n or max(parts.protocol.size(), 2048)
    sets = []
    for k, density in enumerate(parts.density_ends):
        seed = derive_seed(parts.protocol.root_seed, CALIBRATION_SET, k)
        sets.append(_matched(parts, parts.simulator_at(density), n, seed, batch_size))
    tp, tp_match = (EmitterSet.cat([s[i] for s in sets]) for i in (0, 1))
    raw = sigma_coverage(tp, tp_match)
    weight_E = np.concatenate([np.full(len(s[0]), 1.0 / max(len(s[0]), 1)) for s in sets])
    factors = np.asarray(sigma_scale(tp, tp_match, weight_E))
    with torch.no_grad():
        model.sigma_scale.mul_(torch.as_tensor(factors, dtype=model.sigma_scale.dtype, device=model.sigma_scale.device))
    tp.xyz_sig, tp.phot_sig = tp.xyz_sig * torch.as_tensor(factors[1:]).to(tp.xyz_sig), tp.phot_sig * float(factors[0])
    after = sigma_coverage(tp, tp_match)
    return SigmaCalibration(*model.sigma_scale.tolist(), *(raw[f"cover_{a}"] for a in "xyz"),
                            *(after[f"cover_{a}"] for a in "xyz"), n_matched=len(tp), epoch=epoch,
                            measured_by=measured_by, densities=parts.density_ends)
