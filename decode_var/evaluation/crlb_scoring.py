"""Localization error against the Cramér-Rao lower bound of the run's PSF.

One scoring for ``decode-var-eval`` (``crlb_ratio_*`` in metrics.json), the trainer's per-epoch test set
and the model card's precision calibration: RMSE / sqrt(mean CRLB) per axis on matched test emitters
(1 = at the bound). The CRLB is that of the run's PSF model (Gaussian: :func:`~decode_var.data.crlb.gaussian_crlb`;
spline: :meth:`~decode_var.data.spline_psf.SplinePSF.crlb`) at each emitter's position, photons and background,
with the EMCCD excess noise when ``Camera.em_gain`` is set: a :class:`CrlbModel`, parsed once from the param.
Nothing here draws a random number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from decode_var.data.crlb import gaussian_crlb
from decode_var.data.simulation import astigmatism
from decode_var.data.spline_psf import SplinePSF

__all__ = ["CrlbModel", "background_at", "precision_calibration"]


@dataclass(frozen=True)
class CrlbModel:
    """The run's PSF and camera as the CRLB needs them, parsed once from the param (:meth:`parse`).

    Attributes:
        px_size: (x, y) nm per px (``Camera.px_size``; DECODE's x = first image axis).
        em_gain: whether the camera has EM gain (excess noise factor 2 on the Fisher information).
        gaussian: ``VAR.gaussian_psf`` as keyword arguments of :func:`~decode_var.data.crlb.gaussian_crlb`
            (``sigma_0``, ``foc_shift``, ``rl_range``, ``mode_3d``), or None for a spline PSF.
        spline: the run's :class:`~decode_var.data.spline_psf.SplinePSF` (``VAR.psf: spline``), else None.
    """

    px_size: tuple
    em_gain: bool
    gaussian: Optional[dict] = None
    spline: Optional[SplinePSF] = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, param) -> "CrlbModel":
        """From ``Camera.px_size``, ``Camera.em_gain`` and ``VAR.psf`` (``VAR.gaussian_psf`` or the spline
        calibration of ``InOut.calibration_file``, read here once)."""
        em_gain = param.Camera.em_gain is not None
        px = tuple(float(v) for v in param.Camera.px_size)
        if param.VAR.psf == "spline":
            return cls(px, em_gain, spline=SplinePSF.parse(param))
        g = param.VAR.gaussian_psf
        return cls(px, em_gain, gaussian=dict(sigma_0=g.sigma_0, foc_shift=g.foc_shift, rl_range=g.rl_range,
                                              mode_3d=g.mode_3d))

    @property
    def kind(self) -> str:
        """``"gaussian"`` or ``"spline"`` (``VAR.psf``)."""
        return "spline" if self.spline is not None else "gaussian"

    def px(self, xyz_px, phot, bg) -> torch.Tensor:
        """(E, 5) CRLB variances of the run's PSF: x, y in px^2, z in nm^2, phot in photons^2, bg in (photons / px)^2.

        Args:
            xyz_px: (E, 3) x, y in px (DECODE's x = first image axis), z in nm.
            phot: (E,) photons. bg: (E,) photons / px.
        """
        if self.spline is not None:  # autograd Fisher information of the calibration's ROI, also under no_grad
            with torch.enable_grad():
                return self.spline.crlb(xyz_px, phot, bg, em_gain=self.em_gain)
        return gaussian_crlb(xyz_px, phot, bg, em_gain=self.em_gain, **self.gaussian)

    def width_px(self, z_nm) -> np.ndarray:
        """(E, 2) PSF standard deviation along DECODE x, y in px at each z (nm).

        Gaussian PSF: its astigmatic widths (``sigma_0`` in focus for a 2D one). Spline PSF: the second moments
        of the calibration's ROI, on a z grid across the calibrated range, interpolated.
        """
        z_nm = np.asarray(z_nm, dtype=np.float64).reshape(-1)
        if self.spline is not None:
            calib = self.spline.calib
            nx, ny, _ = calib.shape
            psf = SplinePSF((-0.5, nx - 0.5), (-0.5, ny - 0.5), (nx, ny), calib)
            lo, hi = calib.z_range_nm
            grid = np.linspace(lo + 1e-3 * (hi - lo), hi, 65)
            centre = torch.tensor(calib.ref0[:2], dtype=torch.float64)
            xyz = torch.cat([centre.expand(grid.size, 2), torch.from_numpy(grid)[:, None]], 1)
            rois, corner = psf.rois(xyz, torch.ones(grid.size, dtype=torch.float64))
            rois = rois.clamp_min(0)
            w = []
            for axis, coord in ((2, torch.arange(rois.size(1), dtype=torch.float64)),
                                (1, torch.arange(rois.size(2), dtype=torch.float64))):
                prof = rois.sum(axis)
                mean = (prof * coord).sum(1) / prof.sum(1)
                w.append((((coord - mean[:, None]) ** 2 * prof).sum(1) / prof.sum(1)).sqrt().numpy())
            return np.stack([np.interp(z_nm, grid, w[0]), np.interp(z_nm, grid, w[1])], 1)
        g = self.gaussian
        if not g["mode_3d"]:
            return np.full((z_nm.size, 2), float(g["sigma_0"]))
        return astigmatism(torch.from_numpy(z_nm), g["sigma_0"], g["foc_shift"], g["rl_range"]).numpy()

    def of(self, gt_matched) -> Optional[torch.Tensor]:
        """(E, 5) CRLB variances (x, y in nm^2, z nm^2, phot, bg) of matched ground truth, or None."""
        if len(gt_matched) == 0 or gt_matched.bg is None:
            return None
        var = self.px(gt_matched.xyz_px, gt_matched.phot, gt_matched.bg)
        px = torch.tensor(self.px_size, dtype=var.dtype)
        var = var.clone()
        var[:, 0] *= px[0] ** 2
        var[:, 1] *= px[1] ** 2
        return var

    def metrics(self, tp, tp_match) -> dict:
        """RMSE / sqrt(mean CRLB) along x, y, z and laterally on matched emitters (1 = at the bound), as
        ``crlb_ratio_x``, ``crlb_ratio_y``, ``crlb_ratio_z``, ``crlb_ratio_lat`` and the lateral bound
        ``crlb_lat_nm``; an axis whose bound is not finite (z of a 2D PSF) is left out; {} without matches
        or without the ground truth's background (``tp_match.bg``, photons / px).

        Args:
            tp, tp_match: matched predictions and their ground truth (same order), x, y in px
                (:attr:`px_size` nm each), z in nm.
        """
        var = self.of(tp_match)
        if var is None:
            return {}
        var = var.double()
        d = (tp.xyz_px - tp_match.xyz_px).double()
        d[:, :2] *= torch.tensor(self.px_size, dtype=torch.float64)  # nm, as the bounds
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
    (:meth:`decode_var.evaluation.protocol.Protocol.score`): ``{"ratio_x", "ratio_y", "ratio_z", "ratio_lat",
    "n_matched"}`` (a ratio is None where that axis has no finite bound), or None without matches."""
    if not metrics.get("n_tp") or "crlb_ratio_lat" not in metrics:
        return None
    out = {"n_matched": int(metrics["n_tp"])}
    for name in ("x", "y", "z", "lat"):
        out[f"ratio_{name}"] = metrics.get(f"crlb_ratio_{name}")
    return out
