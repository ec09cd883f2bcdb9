"""Localization error against the Cramér-Rao lower bound of the run's PSF.

One scoring for ``decode-var-eval`` (``crlb_ratio_*`` in metrics.json), the trainer's per-epoch test set
and the model card's precision calibration: RMSE / sqrt(mean CRLB) per axis on matched test emitters
(1 = at the bound). The CRLB is that of the run's PSF model (Gaussian: :func:`~decode_var.data.crlb.gaussian_crlb`;
spline: :meth:`~decode_var.data.spline_psf.SplinePSF.crlb`) at each emitter's position, photons and background,
with the EMCCD excess noise when ``Camera.em_gain`` is set. Nothing here draws a random number.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from decode_var.data.crlb import gaussian_crlb
from decode_var.data.spline_psf import SplinePSF

__all__ = ["crlb_px", "crlb_of", "crlb_metrics", "background_at", "precision_calibration"]


def crlb_px(param, xyz_px, phot, bg) -> torch.Tensor:
    """(E, 5) CRLB variances of the run's PSF: x, y in px^2, z in nm^2, phot in photons^2, bg in (photons / px)^2.

    Args:
        xyz_px: (E, 3) x, y in px (DECODE's x = first image axis), z in nm.
        phot: (E,) photons. bg: (E,) photons / px.
    """
    em_gain = param.Camera.em_gain is not None
    if param.VAR.psf == "spline":  # autograd Fisher information of the calibration's ROI, also under no_grad
        with torch.enable_grad():
            return SplinePSF.parse(param).crlb(xyz_px, phot, bg, em_gain=em_gain)
    g = param.VAR.gaussian_psf
    return gaussian_crlb(xyz_px, phot, bg, sigma_0=g.sigma_0, foc_shift=g.foc_shift, rl_range=g.rl_range,
                         em_gain=em_gain, mode_3d=g.mode_3d)


def crlb_of(param, gt_matched) -> Optional[torch.Tensor]:
    """(E, 5) CRLB variances (x, y in nm^2, z nm^2, phot, bg) of matched ground truth, or None."""
    if len(gt_matched) == 0 or gt_matched.bg is None:
        return None
    var = crlb_px(param, gt_matched.xyz_px, gt_matched.phot, gt_matched.bg)
    px = torch.tensor(param.Camera.px_size, dtype=var.dtype)
    var = var.clone()
    var[:, 0] *= px[0] ** 2
    var[:, 1] *= px[1] ** 2
    return var


def crlb_metrics(param, tp, tp_match) -> dict:
    """RMSE / sqrt(mean CRLB) along x, y, z and laterally on matched emitters (1 = at the bound), as
    ``crlb_ratio_x``, ``crlb_ratio_y``, ``crlb_ratio_z``, ``crlb_ratio_lat`` and the lateral bound
    ``crlb_lat_nm``; an axis whose bound is not finite (z of a 2D PSF) is left out; {} without matches
    or without the ground truth's background (``tp_match.bg``, photons / px).

    Args:
        tp, tp_match: matched predictions and their ground truth (same order), x, y in px (``Camera.px_size``
            nm each), z in nm.
    """
    var = crlb_of(param, tp_match)
    if var is None:
        return {}
    var = var.double()
    d = (tp.xyz_px - tp_match.xyz_px).double()
    d[:, :2] *= torch.tensor([float(v) for v in param.Camera.px_size], dtype=torch.float64)  # nm, as the bounds
    out = {}
    for i, name in enumerate(("x", "y", "z")):
        ok = torch.isfinite(var[:, i])
        if ok.any():
            out[f"crlb_ratio_{name}"] = float(d[ok, i].pow(2).mean().sqrt() / var[ok, i].mean().sqrt())
    lat_var = var[:, 0] + var[:, 1]
    ok = torch.isfinite(lat_var)
    if ok.any():
        out["crlb_ratio_lat"] = float(d[ok, :2].pow(2).sum(1).mean().sqrt() / lat_var[ok].mean().sqrt())
        out["crlb_lat_nm"] = math.sqrt(float(lat_var[ok].mean()))
    return out


def background_at(bg_NHW: torch.Tensor, em) -> torch.Tensor:
    """(E,) background (photons / px) of each emitter's frame at the pixel it lies in (px, pixel i
    centred on i; x = first axis), for backgrounds that vary across the frame."""
    H, W = bg_NHW.shape[-2:]
    xy = em.xyz_px[:, :2].round().long()
    return bg_NHW[em.frame_ix, xy[:, 0].clamp(0, H - 1), xy[:, 1].clamp(0, W - 1)].clone()


def precision_calibration(metrics: dict) -> Optional[dict]:
    """The model card's precision calibration from the scored test set's metrics
    (:func:`decode_var.evaluation.protocol.score`): ``{"ratio_x", "ratio_y", "ratio_z", "ratio_lat",
    "n_matched"}`` (a ratio is None where that axis has no finite bound), or None without matches."""
    if not metrics.get("n_tp") or "crlb_ratio_lat" not in metrics:
        return None
    out = {"n_matched": int(metrics["n_tp"])}
    for name in ("x", "y", "z", "lat"):
        out[f"ratio_{name}"] = metrics.get(f"crlb_ratio_{name}")
    return out
