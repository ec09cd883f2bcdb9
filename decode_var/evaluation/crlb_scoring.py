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


def crlb_metrics(param, tp, tp_match, metrics) -> dict:
    """RMSE / sqrt(mean CRLB) for x, y, lateral, z (1 = at the bound)."""
    var = crlb_of(param, tp_match)
    if var is None:
        return {}
    out = {}
    d = (tp.xyz_nm - tp_match.xyz_nm).double()
    for i, name in enumerate(("x", "y", "z")):
        col = var[:, i].double()
        ok = torch.isfinite(col)
        if ok.any():
            rmse = float(d[ok, i].pow(2).mean().sqrt())
            out[f"crlb_ratio_{name}"] = rmse / math.sqrt(float(col[ok].mean()))
    lat_var = (var[:, 0] + var[:, 1]).double()
    if torch.isfinite(lat_var).any():
        out["crlb_ratio_lat"] = metrics.get("rmse_lat", float("nan")) / math.sqrt(float(lat_var.mean()))
        out["crlb_lat_nm"] = math.sqrt(float(lat_var.mean()))
    return out


def background_at(bg_NHW: torch.Tensor, em) -> torch.Tensor:
    """(E,) background (photons / px) of each emitter's frame at the pixel it lies in (px, pixel i
    centred on i; x = first axis), for backgrounds that vary across the frame."""
    H, W = bg_NHW.shape[-2:]
    xy = em.xyz_px[:, :2].round().long()
    return bg_NHW[em.frame_ix, xy[:, 0].clamp(0, H - 1), xy[:, 1].clamp(0, W - 1)].clone()


def precision_calibration(param, tp, tp_match, bg_NHW: Optional[torch.Tensor] = None) -> Optional[dict]:
    """The model card's precision calibration: RMSE / sqrt(mean CRLB) along x, y, z and laterally.

    Args:
        tp, tp_match: matched predictions and their ground truth (same order), x, y in px, z in nm.
        bg_NHW: the test set's true background (photons / px) to read each ground-truth emitter's
            background from; None: ``tp_match.bg``.

    Returns:
        ``{"ratio_x", "ratio_y", "ratio_z", "ratio_lat", "n_matched"}`` (a ratio is None where the CRLB of
        that axis is not finite, e.g. z of a 2D PSF), or None when nothing is matched or no background is known.
    """
    if len(tp_match) == 0:
        return None
    bg = background_at(bg_NHW.cpu(), tp_match) if bg_NHW is not None else tp_match.bg
    if bg is None:
        return None
    var = crlb_px(param, tp_match.xyz_px, tp_match.phot, bg).double()
    px = torch.tensor([float(v) for v in param.Camera.px_size], dtype=torch.float64)
    d = (tp.xyz_px - tp_match.xyz_px).double()
    d[:, :2] *= px  # nm, as the bounds below
    var[:, :2] *= px ** 2
    out = {"n_matched": int(len(tp))}
    for i, name in enumerate(("x", "y", "z")):
        ok = torch.isfinite(var[:, i])
        out[f"ratio_{name}"] = (float(d[ok, i].pow(2).mean().sqrt() / var[ok, i].mean().sqrt())
                                if ok.any() else None)
    ok = torch.isfinite(var[:, 0] + var[:, 1])
    out["ratio_lat"] = (float(d[ok, :2].pow(2).sum(1).mean().sqrt() / (var[ok, 0] + var[ok, 1]).mean().sqrt())
                        if ok.any() else None)
    return out
