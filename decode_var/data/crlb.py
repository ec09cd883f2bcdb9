"""Cramér-Rao lower bound of (x, y, z, phot, bg) for DECODE's (astigmatic) Gaussian PSF.

Image model of one emitter on a pixel grid whose pixel ``i`` covers ``[i - 0.5, i + 0.5)`` px (DECODE's
default ``psf_extent``), as in DECODE's ``GaussianPSF``:

    mu_k = N * Px_k * Py_k + b,    Px_k = (erf((e_{k+1} - x) / (sqrt(2) sx)) - erf((e_k - x) / (sqrt(2) sx))) / 2

with ``sx = sigma_0 sqrt(1 + ((z + foc_shift) / rl_range)^2)``, ``sy`` with ``z - foc_shift`` (3D), or
``sx = sy = sigma_0`` (2D). Pixel counts are Poisson; the Fisher information is
``I_ij = sum_k d_i mu_k d_j mu_k / mu_k`` with analytic derivatives, and the bound is ``diag(I^-1)``.
An EMCCD (em gain) has excess noise factor F^2 = 2, which halves the information (doubles the bound).

The ROI is centred on the emitter's pixel and not cut by frame borders: the bound of an emitter on an
infinitely large frame. Emitters close to a frame edge can in truth be localised slightly worse.
"""
from __future__ import annotations

import math
import numpy as np
import torch

from decode_var.core.errors import ShapeError
from decode_var.core.emitters import as_xyz3

__all__ = ["gaussian_crlb", "crlb_ratio", "mortensen_var"]

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_SQRTPI = math.sqrt(math.pi)


def _axis_terms(edges_ER1: torch.Tensor, pos_E: torch.Tensor, sig_E: torch.Tensor):
    """Pixel integral P, dP/dpos and dP/dsigma along one axis; edges (E, R+1), returns each (E, R)."""
    u = (edges_ER1 - pos_E[:, None]) / (_SQRT2 * sig_E[:, None])
    g = torch.exp(-u ** 2)
    erf = torch.erf(u)
    p = 0.5 * (erf[:, 1:] - erf[:, :-1])
    dp_dpos = -(g[:, 1:] - g[:, :-1]) / (_SQRT2PI * sig_E[:, None])
    ug = u * g
    dp_dsig = -(ug[:, 1:] - ug[:, :-1]) / (_SQRTPI * sig_E[:, None])
    return p, dp_dpos, dp_dsig


def photons_and_background(phot, bg, n: int, who: str):
    """(E,) float64 photons and background (photons / px; a scalar bg is broadcast) for ``n`` emitters.

    Raises:
        ShapeError: naming ``who`` when the counts differ from the positions'.
    """
    phot = torch.as_tensor(phot, dtype=torch.float64).reshape(-1)
    bg = torch.as_tensor(bg, dtype=torch.float64).reshape(-1)
    if bg.numel() == 1:
        bg = bg.expand(n)
    if phot.numel() != n or bg.numel() != n:
        raise ShapeError(f"{who}: {n} positions but {phot.numel()} photon and {bg.numel()} bg values.")
    return phot, bg


def gaussian_crlb(xyz_px, phot, bg, *, sigma_0: float, foc_shift: float = 250.0, rl_range: float = 280.0,
                  roi_size: int = 25, em_gain: bool = False, mode_3d: bool = True,
                  chunk: int = 4096) -> torch.Tensor:
    """CRLB (variances) of x, y, z, phot, bg for each emitter.

    Args:
        xyz_px: (E, 3) x, y in px (pixel i centred on i), z in nm. (E, 2) is accepted for 2D.
        phot: (E,) photons per emitter.
        bg: (E,) background in photons / px.
        sigma_0: in-focus PSF width in px.
        foc_shift: astigmatic focal shift in nm.
        rl_range: Rayleigh range in nm.
        roi_size: odd side in px of the ROI the emitter is fitted in. The x, y, z bounds hardly change once
            the ROI holds the PSF (25 px: +-2.6 sigma of a 4.6 px wide PSF); the phot and bg bounds do, since
            more pixels tell more about a uniform background. Fixed, so a bound never depends on the
            other emitters of the call.
        em_gain: True for an EMCCD (excess noise factor 2: variances doubled).
        mode_3d: False for a 2D Gaussian of width sigma_0 (z is not estimated; its variance is nan).
        chunk: emitters per vectorised block (memory bound).

    Returns:
        (E, 5) float32 variances: x, y in px^2, z in nm^2, phot in photons^2, bg in (photons / px)^2.
    """
    xyz = as_xyz3(xyz_px, torch.float64, "gaussian_crlb's xyz_px")
    n = xyz.size(0)
    phot, bg = photons_and_background(phot, bg, n, "gaussian_crlb")
    if n == 0:
        return torch.zeros(0, 5)

    sx, sy, dsx_dz, dsy_dz = _sigmas(xyz[:, 2], sigma_0, foc_shift, rl_range, mode_3d)
    if roi_size < 3 or roi_size % 2 != 1:
        raise ValueError(f"roi_size must be an odd number >= 3, got {roi_size}.")

    out = []
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        out.append(_crlb_block(xyz[sl], phot[sl], bg[sl], sx[sl], sy[sl], dsx_dz[sl], dsy_dz[sl],
                               roi_size, mode_3d))
    var = torch.cat(out, 0)
    if em_gain:
        var = var * 2.0
    return var.float()


def _sigmas(z, sigma_0, foc_shift, rl_range, mode_3d):
    if not mode_3d:
        s = torch.full_like(z, float(sigma_0))
        return s, s, torch.zeros_like(z), torch.zeros_like(z)
    zx = (z + foc_shift) / rl_range
    zy = (z - foc_shift) / rl_range
    sx = sigma_0 * torch.sqrt(1 + zx ** 2)
    sy = sigma_0 * torch.sqrt(1 + zy ** 2)
    return sx, sy, sigma_0 ** 2 * zx / (rl_range * sx), sigma_0 ** 2 * zy / (rl_range * sy)


def _crlb_block(xyz, phot, bg, sx, sy, dsx_dz, dsy_dz, roi_size, mode_3d):
    half = roi_size // 2
    steps = torch.arange(-half, half + 2, dtype=torch.float64) - 0.5  # R + 1 pixel edges around 0
    edges_x = torch.round(xyz[:, :1]) + steps
    edges_y = torch.round(xyz[:, 1:2]) + steps
    px, dpx_dx, dpx_ds = _axis_terms(edges_x, xyz[:, 0], sx)
    py, dpy_dy, dpy_ds = _axis_terms(edges_y, xyz[:, 1], sy)

    N = phot[:, None, None]
    # maps indexed (E, x pixel, y pixel) like DECODE's frames
    shape_px = px[:, :, None] * py[:, None, :]
    mu = (N * shape_px + bg[:, None, None]).clamp_min(1e-30)
    derivs = [N * dpx_dx[:, :, None] * py[:, None, :],
              N * px[:, :, None] * dpy_dy[:, None, :]]
    if mode_3d:
        derivs.append(N * (dpx_ds[:, :, None] * dsx_dz[:, None, None] * py[:, None, :]
                           + px[:, :, None] * dpy_ds[:, None, :] * dsy_dz[:, None, None]))
    derivs += [shape_px, torch.ones_like(mu)]
    d = torch.stack(derivs, 1).flatten(2)  # (E, P, R*R)
    fisher = torch.einsum("epk,eqk->epq", d / mu.flatten(1)[:, None, :], d)
    var = torch.diagonal(torch.linalg.inv(fisher), dim1=1, dim2=2)
    if not mode_3d:
        var = torch.cat([var[:, :2], torch.full_like(var[:, :1], float("nan")), var[:, 2:]], 1)
    return var


def mortensen_var(n_phot: float, bg: float, sigma: float, a: float = 1.0, em_gain: bool = False) -> float:
    """Mortensen et al. 2010 (Nat. Methods 7:377) MLE variance of x for a 2D Gaussian on pixels of size a.

    ``F sa^2 / N / (1 + int_0^1 ln t / (1 + t / tau) dt)`` with ``sa^2 = sigma^2 + a^2 / 12``,
    ``tau = 2 pi sa^2 b / (N a^2)`` and F = 2 for an EMCCD, else 1. This is the CRLB approximation; the
    better known ``sa^2 / N (16/9 + 8 pi sa^2 b / (N a^2))`` is their *least-squares* fit variance, 10-40 %
    above the bound.
    """
    from scipy.integrate import quad  # lazy: 0.35 s on every start-up, for this reference formula only

    sa2 = sigma ** 2 + a ** 2 / 12
    tau = 2 * math.pi * sa2 * bg / (n_phot * a ** 2)
    if tau == 0:
        integral = 0.0
    else:
        integral = quad(lambda t: math.log(t) / (1 + t / tau), 0.0, 1.0)[0]
    return (2.0 if em_gain else 1.0) * sa2 / n_phot / (1 + integral)


def crlb_ratio(rmse, crlb_var) -> np.ndarray:
    """RMSE divided by the root of the mean CRLB variance, per dimension (1 = at the bound).

    Args:
        rmse: (D,) RMSE per dimension, in the same unit as ``sqrt(crlb_var)``.
        crlb_var: (E, D) CRLB variances of the same emitters; non-finite rows are ignored per dimension.
    """
    rmse = np.asarray(rmse, dtype=np.float64).reshape(-1)
    var = np.asarray(torch.as_tensor(crlb_var).double().numpy() if isinstance(crlb_var, torch.Tensor)
                     else crlb_var, dtype=np.float64)
    if var.ndim == 1:
        var = var[:, None]
    if var.shape[1] != rmse.size:
        raise ShapeError(f"crlb_ratio: {rmse.size} RMSE values but CRLB has {var.shape[1]} columns.")
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = np.where(np.isfinite(var), var, np.nan)
        mean = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in finite.T])
        return rmse / np.sqrt(mean)
