"""Estimate the simulation's settings from a user's movie (``decode-var-init``).

Pure functions on frames already read (a sample of the movie in consecutive blocks, ``frames_BTHW``:
B blocks of T consecutive frames, x = rows). Units: raw frames in ADU, everything after the camera
conversion in photons (photons / px for backgrounds), positions and widths in px, times in frames.

1. **Camera** (:func:`photon_transfer`): temporal mean and variance of background pixels (spots and their
   neighbours masked, :func:`spot_mask`). Variances come from differences of consecutive frames (a slow
   drift cancels); ``var = a + s * mean`` over pixels and stretches of frames gives the slope ``s`` in ADU
   per ADU: ``1 / c`` for an sCMOS (Poisson) and ``2 / c`` for an EMCCD (excess noise factor 2), where
   ``c = e_per_adu / em_gain`` (``e_per_adu`` without gain) is the electrons per ADU of one photo-electron.
   The intercept gives the baseline: ``a = r^2 + 1/12 - s (baseline - 1/2)`` (read noise r in ADU, the
   camera's floor to whole ADU). The third cumulant tells the camera type: ``kappa_3 / kappa_2 = excess * s``
   with ``excess`` 1 (Poisson) or 1.5 (EMCCD: exponentially distributed gain per electron).
2. **Background** (:func:`background_maps`, :func:`background_model`): per-frame maps as normalised
   convolutions of the unmasked pixels; their levels, spatial structure and drift map to
   ``Simulation.bg_uniform``, the Perlin keys and ``VAR.bg_drift``.
3. **Emitters** (:func:`measure_spots`, :func:`spot_stats`, :func:`calibrate`): detection and Gaussian MLE
   (:mod:`decode_var.data.spots`) and linking of consecutive frames give photons, widths, spots per frame
   and photons per track. These measured values are biased (dim partial on-times go undetected, neighbours
   overlap), so the settings are refined until a movie simulated with them (same background, camera and
   measurement) gives the user's movie's values: the biases cancel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from decode_var.data.simulation import perlin_NHW
from decode_var.data.spots import cut_rois, gauss_filter, mle_fit, spot_signal

#: Spots: local maxima this many robust standard deviations above the filtered frame's background.
DETECT_SIGMAS = 5.0
#: Pixels within this radius of a spot (this frame and its neighbours) are not background, px.
MASK_RADIUS = 4
#: Third-cumulant ratio between sCMOS (1.0) and EMCCD (1.5): above it, the camera has excess noise.
EXCESS_SPLIT = 1.25


# ------------------------------------------------------------------------------------------ camera
def robust_threshold(signal_N1HW: torch.Tensor, sigmas: float = DETECT_SIGMAS) -> torch.Tensor:
    """(N,) per-frame threshold: median + ``sigmas`` x 1.4826 MAD of the frame's pixels (same units)."""
    flat = signal_N1HW.flatten(1)
    med = flat.median(1).values
    mad = (flat - med[:, None]).abs().median(1).values * 1.4826
    return med + sigmas * mad


def peaks(frames_NHW: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: local maxima (3 x 3) of :func:`~decode_var.data.spots.spot_signal` more than
    :data:`DETECT_SIGMAS` robust standard deviations above the frame's median (any linear scale: ADU, photons)."""
    signal = spot_signal(frames_NHW)
    return (signal == F.max_pool2d(signal, 3, 1, 1)) & (signal > robust_threshold(signal).view(-1, 1, 1, 1))


def spot_mask(frames_BTHW: torch.Tensor, radius: int = MASK_RADIUS) -> torch.Tensor:
    """(B, T, H, W) bool: pixels within ``radius`` px of a spot in the same or a neighbouring frame.

    Spots: :func:`peaks`.
    """
    B, T, H, W = frames_BTHW.shape
    near = F.max_pool2d(peaks(frames_BTHW.reshape(B * T, H, W)).float(), 2 * radius + 1, 1, radius)
    near = near[:, 0].view(B, T, H, W) > 0
    out = near.clone()
    out[:, 1:] |= near[:, :-1]
    out[:, :-1] |= near[:, 1:]
    return out


@dataclass
class PhotonTransfer:
    """The movie's photon transfer curve, ADU.

    Attributes:
        slope: variance per mean above the baseline, ADU (``excess / c``).
        intercept: variance at mean 0, ADU^2.
        skew_ratio: kappa_3 / kappa_2 of the background noise, ADU; / slope = the excess (:meth:`excess_for`).
        mean_lo, mean_hi: 5th and 95th percentile of the background means the line was fitted on, ADU.
        n_values: (pixel, stretch) means in the fit.
        level, level_var: the count-weighted mean of the means (ADU) and of the variances (ADU^2).
        cov: 2 x 2 covariance of (intercept, slope) from the fit's residuals.
    """

    slope: float
    intercept: float
    skew_ratio: float
    mean_lo: float
    mean_hi: float
    n_values: int
    level: float
    level_var: float
    cov: list

    def excess_for(self, slope: float) -> float:
        """``kappa_3 / (kappa_2 slope)``: about 1.0 for an sCMOS (Poisson), 1.5 for an EMCCD (see the module doc)."""
        return self.skew_ratio / slope

    @property
    def excess(self) -> float:
        """:meth:`excess_for` the fitted line's slope."""
        return self.excess_for(self.slope)


def _clipped_var(d_NP: torch.Tensor, ok_NP: torch.Tensor, clip: float = 4.5):
    """Per-column variance (about 0) of ``d`` where ``ok``, clipped at ``clip`` sd three times: (var, count)."""
    ok = ok_NP.to(d_NP.dtype)
    var = (d_NP ** 2 * ok).sum(0) / ok.sum(0).clamp(min=1)
    for _ in range(3):
        keep = ok * (d_NP ** 2 < clip ** 2 * var).to(d_NP.dtype)
        var = (d_NP ** 2 * keep).sum(0) / keep.sum(0).clamp(min=1)
    return var, keep.sum(0)


def _frame_median(x_NHW: torch.Tensor, ok_NHW: torch.Tensor) -> torch.Tensor:
    """(N,) median of each frame's ``ok`` pixels (0 where none)."""
    return torch.stack([xi[oi].median() if oi.any() else xi.new_zeros(()) for xi, oi in zip(x_NHW, ok_NHW)])


def _transfer_points(adu_BTHW: torch.Tensor, ok_BTHW: torch.Tensor, stretch: int):
    """Means and half the variances of consecutive differences per pixel and stretch of frames, with counts."""
    means, variances, counts = [], [], []
    for x_THW, ok_THW in zip(adu_BTHW.double(), ok_BTHW):
        d = x_THW[1:] - x_THW[:-1]
        okd = ok_THW[1:] & ok_THW[:-1]
        d = d - _frame_median(d, okd)[:, None, None]  # a jump of the whole frame's level is not noise
        for t0 in range(0, len(d), stretch):
            sl = slice(t0, t0 + stretch)
            var, n = _clipped_var(d[sl].flatten(1), okd[sl].flatten(1))
            okx = ok_THW[t0:t0 + stretch + 1].flatten(1).double()
            mean = (x_THW[t0:t0 + stretch + 1].flatten(1) * okx).sum(0) / okx.sum(0).clamp(min=1)
            means.append(mean)
            variances.append(var / 2)
            counts.append(n)
    return torch.cat(means), torch.cat(variances), torch.cat(counts)


def _skew_ratio(adu_BTHW: torch.Tensor, ok_BTHW: torch.Tensor) -> float:
    """``kappa_3 / kappa_2`` of the background noise (ADU): ``excess x slope``, excess 1 Poisson, 1.5 EMCCD.

    On ``r_t = x_t - (x_{t-1} + x_{t+1}) / 2`` (a linear drift cancels): ``kappa_3(r) = 0.75 kappa_3``,
    ``kappa_2(r) = 1.5 kappa_2``; central moments, pooled over pixels (the ratio does not depend on the level).
    """
    parts = []
    for x_THW, ok_THW in zip(adu_BTHW.double(), ok_BTHW):
        r = x_THW[1:-1] - 0.5 * (x_THW[:-2] + x_THW[2:])
        ok = ok_THW[1:-1] & ok_THW[:-2] & ok_THW[2:]
        r = r - _frame_median(r, ok)[:, None, None]
        parts.append(r[ok])
    v = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if v.numel() < 100:
        return float("nan")
    keep = torch.ones_like(v, dtype=torch.bool)
    for _ in range(3):
        keep = (v - v[keep].mean()).abs() < 7 * v[keep].std()
    w = v[keep] - v[keep].mean()
    return float(2 * (w ** 3).mean() / (w ** 2).mean())


def photon_transfer(adu_BTHW: torch.Tensor, mask_BTHW: torch.Tensor, stretch: int = 50) -> PhotonTransfer:
    """The photon transfer line ``var = intercept + slope * mean`` (ADU) of the unmasked pixels.

    Each pixel and stretch of ``stretch`` consecutive frames gives a mean and a variance (half the mean
    square of consecutive differences, clipped at 4.5 sd against what the mask missed); the line is a
    least-squares fit weighted by count / (the line's variance)^2, iterated. Means that do not spread (a flat,
    steady background) leave the line unknown: see :func:`slope_error`, :func:`baseline_error`.
    """
    mean, var, n = _transfer_points(adu_BTHW, ~mask_BTHW, stretch)
    good = n >= 10
    mean, var, n = mean[good], var[good], n[good]
    if mean.numel() < 10:
        raise ValueError("too few background pixels for the photon transfer curve")
    A = torch.stack([torch.ones_like(mean), mean], 1)
    w = n
    for _ in range(3):  # weights count / variance^2 of the line, not of the noisy points (that would bias low)
        coef = torch.linalg.lstsq(A * w.sqrt()[:, None], (var * w.sqrt())[:, None]).solution[:, 0]
        w = n / (A @ coef).clamp(min=1e-3 * float(var.median())) ** 2
    resid = var - A @ coef
    cov = float((w * resid ** 2).sum() / max(len(var) - 2, 1)) * torch.linalg.inv(A.T @ (A * w[:, None]))
    lo, hi = torch.quantile(mean, torch.tensor([0.05, 0.95], dtype=mean.dtype))
    level, level_var = float((mean * n).sum() / n.sum()), float((var * n).sum() / n.sum())
    return PhotonTransfer(float(coef[1]), float(coef[0]), _skew_ratio(adu_BTHW, ~mask_BTHW), float(lo), float(hi),
                          int(mean.numel()),
                          level, level_var, cov.tolist())


def slope_through(pt: PhotonTransfer, baseline: float, read_sigma_adu: float) -> float:
    """The slope (ADU per ADU) of the line through the mean background point and a known ``baseline`` (ADU):
    what a flat, steady background allows (its means do not spread, so a fitted line has no lever)."""
    return (pt.level_var - read_sigma_adu ** 2 - 1 / 12) / max(pt.level - baseline + 0.5, 1e-9)


def transfer_baseline(pt: PhotonTransfer, read_sigma_adu: float) -> float:
    """The baseline (ADU) the line implies for a read noise of ``read_sigma_adu``: the mean where the
    variance is the read noise's plus the floor's 1/12 (the camera floors to whole ADU: mean - 1/2)."""
    return 0.5 + (read_sigma_adu ** 2 + 1 / 12 - pt.intercept) / pt.slope


def baseline_error(pt: PhotonTransfer, read_sigma_adu: float) -> float:
    """Standard error (ADU) of :func:`transfer_baseline`, from the line's covariance (delta method)."""
    b = transfer_baseline(pt, read_sigma_adu)
    jac = torch.tensor([-1.0 / pt.slope, -(b - 0.5) / pt.slope], dtype=torch.float64)
    return abs(float(jac @ torch.tensor(pt.cov, dtype=torch.float64) @ jac)) ** 0.5


def slope_error(pt: PhotonTransfer) -> float:
    """Relative standard error of the line's slope."""
    return abs(pt.cov[1][1]) ** 0.5 / abs(pt.slope)


# -------------------------------------------------------------------------------------- background
def background_maps(photons_BTHW: torch.Tensor, mask_BTHW: torch.Tensor, stretch: int = 10,
                    sigma: float = 2.0) -> torch.Tensor:
    """(B, T, H, W) background, photons / px: per stretch of ``stretch`` frames, the unmasked pixels
    smoothed by a Gaussian of ``sigma`` px and divided by the smoothed mask (a normalised convolution, so
    spots leave no hole and no bias); pixels with nothing unmasked near them take a wider smoothing's value."""
    B, T, H, W = photons_BTHW.shape
    out = torch.empty_like(photons_BTHW)
    ok = (~mask_BTHW).to(photons_BTHW.dtype)
    for t0 in range(0, T, stretch):
        sl = slice(t0, t0 + stretch)
        num_B1HW = (photons_BTHW[:, sl] * ok[:, sl]).sum(1, keepdim=True)
        den_B1HW = ok[:, sl].sum(1, keepdim=True)
        near = gauss_filter(num_B1HW, sigma) / gauss_filter(den_B1HW, sigma).clamp(min=1e-6)
        wide = gauss_filter(num_B1HW, 4 * sigma) / gauss_filter(den_B1HW, 4 * sigma).clamp(min=1e-6)
        enough = gauss_filter(den_B1HW, sigma) > 0.05 * den_B1HW.amax((-2, -1), keepdim=True)
        out[:, sl] = torch.where(enough, near, wide)
    return out


def autocorrelation_halfwidth(map_HW: torch.Tensor) -> float:
    """Lag (px) at which the spatial autocorrelation of ``map_HW`` (mean removed) falls to 0.5, averaged
    over the two axes and linearly interpolated; half the smaller frame size if it never does."""
    x = map_HW.double() - map_HW.double().mean()
    var = (x ** 2).mean()
    if var <= 0:
        return 0.0
    n = min(x.shape) // 2
    rho = torch.stack([0.5 * ((x[k:] * x[:-k]).mean() + (x[:, k:] * x[:, :-k]).mean()) / var
                       for k in range(1, n + 1)])
    rho = torch.cat([torch.ones(1, dtype=rho.dtype), rho])
    below = torch.nonzero(rho < 0.5)
    if len(below) == 0:
        return float(n)
    k = int(below[0])
    return float(k - 1 + (rho[k - 1] - 0.5) / (rho[k - 1] - rho[k]))


@dataclass
class PerlinUnit:
    """Statistics of the simulator's Perlin field of amplitude 1 on one frame size (over many draws)."""

    scale: int
    mean: float  # mean value
    std: float  # spatial standard deviation within a field
    halfwidth: float  # autocorrelation half-width, px


def perlin_units(img_shape, scales=range(1, 9), n: int = 24, seed: int = 0) -> list[PerlinUnit]:
    """:class:`PerlinUnit` of each lattice scale on frames of ``img_shape`` px (seeded, CPU)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for res in scales:
        f_NHW = perlin_NHW(n, img_shape, int(res), g)
        hw = sum(autocorrelation_halfwidth(f) for f in f_NHW) / n
        std = float(f_NHW.flatten(1).var(1).mean().sqrt())
        out.append(PerlinUnit(int(res), float(f_NHW.mean()), std, hw))
    return out


@dataclass
class BackgroundModel:
    """The simulator's background settings for a movie, photons / px.

    Attributes:
        bg_uniform: [low, high] of the flat part, drawn per frame (5th and 95th percentile of the movie's).
        perlin_amplitude: peak of the smooth field (None: the background is flat).
        perlin_scale: Perlin lattice cells across the frame (features about img_size / scale px).
        drift: relative change of the level per frame (the movie's linear trend / its mean level).
        mean: the movie's mean background; level_lo, level_hi: 5th and 95th percentile of the frames' levels.
        rel_spatial_sd: spatial sd of the time-averaged background / its mean.
        halfwidth: autocorrelation half-width of the time-averaged background, px.
        change: relative change of the level over the movie (last minus first frame of the trend).
        perlin_mean: mean of the Perlin field of amplitude 1 at that scale (0 without one).
    """

    bg_uniform: list
    perlin_amplitude: Optional[float]
    perlin_scale: int
    drift: float
    mean: float
    level_lo: float
    level_hi: float
    rel_spatial_sd: float
    halfwidth: float
    change: float
    perlin_mean: float = 0.0

    @property
    def simulated_mean(self) -> float:
        """Mean background (photons / px) the simulator draws with these settings."""
        return 0.5 * sum(self.bg_uniform) + (self.perlin_amplitude or 0.0) * self.perlin_mean


#: Below this relative spatial sd, the time-averaged background counts as flat (no Perlin field).
FLAT_BACKGROUND = 0.05


def background_model(bg_BTHW: torch.Tensor, frame_BT: torch.Tensor, n_movie_frames: int) -> BackgroundModel:
    """Map background maps (photons / px, frames ``frame_BT`` of the movie) to the simulator's settings.

    The levels (spatial means per frame) give ``bg_uniform``; the time-averaged map's spatial sd and
    autocorrelation give the Perlin amplitude and the scale whose unit field matches them; the linear
    trend of the levels over the movie gives the drift.
    """
    level_N = bg_BTHW.mean((-2, -1)).flatten().double()
    t_N = frame_BT.flatten().double()
    mean_HW = bg_BTHW.flatten(0, 1).mean(0)
    mean = float(level_N.mean())
    lo, hi = (float(v) for v in torch.quantile(level_N, torch.tensor([0.05, 0.95], dtype=torch.float64)))
    rate = float(torch.linalg.lstsq(torch.stack([torch.ones_like(t_N), t_N - t_N.mean()], 1),
                                    level_N[:, None]).solution[1, 0]) if len(t_N) > 1 else 0.0
    rel_sd = float(mean_HW.std() / max(mean, 1e-9))
    halfwidth = autocorrelation_halfwidth(mean_HW)
    amp, scale, unit_mean, flat_N = None, 4, 0.0, level_N
    if rel_sd >= FLAT_BACKGROUND:
        unit = min(perlin_units(tuple(mean_HW.shape)), key=lambda u: abs(math.log(max(u.halfwidth, 0.1)
                                                                                  / max(halfwidth, 0.1))))
        amp, scale, unit_mean = float(mean_HW.std()) / unit.std, unit.scale, unit.mean
        flat_N = level_N - amp * unit.mean
    flo, fhi = (max(0.0, float(v)) for v in torch.quantile(flat_N, torch.tensor([0.05, 0.95], dtype=torch.float64)))
    return BackgroundModel([flo, fhi], amp, scale, abs(rate) / max(mean, 1e-9), mean, lo, hi, rel_sd, halfwidth,
                           rate * max(n_movie_frames - 1, 0) / max(mean, 1e-9), unit_mean)


# ----------------------------------------------------------------------------------------- emitters
@dataclass
class Spots:
    """Fitted spots of a movie sample; (E,) tensors unless said otherwise.

    Attributes:
        frame: frame index in the sample, block * T + frame in the block.
        x, y: position, px (x = row). phot: photons. bg: background, photons / px. sx, sy: widths, px.
        prev, next: index of the spot it is linked to in the previous / next frame, -1 for none.
        track: index of the first spot of its track (the same for all spots of one track).
        n_frames: frames measured.
    """

    frame: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    phot: torch.Tensor
    bg: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    prev: torch.Tensor
    next: torch.Tensor
    track: torch.Tensor
    n_frames: int


def fit_spots(photons_BTHW: torch.Tensor, roi: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Detect spots (:data:`DETECT_SIGMAS` robust sd) and fit each by Gaussian MLE: (frame (E,), theta (E, 6)
    with x, y in px of the frame) for the fits that stayed within 1.5 px of their maximum, widths off the bounds."""
    B, T, H, W = photons_BTHW.shape
    x_NHW = photons_BTHW.reshape(B * T, H, W)
    f, _, r, c = torch.nonzero(peaks(x_NHW), as_tuple=True)
    if len(f) == 0:
        return f, torch.zeros(0, 6, dtype=torch.float64)
    theta = torch.cat([mle_fit(part) for part in cut_rois(x_NHW, f, r, c, roi).split(20000)])
    ok = (theta[:, :2].abs() <= 1.5).all(1) & torch.isfinite(theta).all(1) & \
        (theta[:, 4:] > 0.55).all(1) & (theta[:, 4:] < 4.9).all(1)
    theta, f, r, c = theta[ok], f[ok], r[ok], c[ok]
    theta[:, 0] += r
    theta[:, 1] += c
    return f, theta


def link(frame_E: torch.Tensor, xy_E2: torch.Tensor, frames_per_block: int, radius: float = 1.0):
    """Mutual nearest neighbours within ``radius`` px in consecutive frames of one block: (prev, next) (E,)
    indices, -1 for none. ``frame_E`` sorted; blocks of ``frames_per_block`` frames are not linked across."""
    E = len(frame_E)
    prev = torch.full((E,), -1, dtype=torch.long)
    nxt = torch.full((E,), -1, dtype=torch.long)
    if E == 0:
        return prev, nxt
    n_frames = int(frame_E.max()) + 1
    counts = torch.bincount(frame_E, minlength=n_frames)
    K = int(counts.max())
    slot = torch.arange(E) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pos_FK2 = torch.full((n_frames, K, 2), float("inf"), dtype=torch.float64)
    pos_FK2[frame_E, slot] = xy_E2.double()
    idx_FK = torch.full((n_frames, K), -1, dtype=torch.long)
    idx_FK[frame_E, slot] = torch.arange(E)
    d_FKK = torch.cdist(pos_FK2[:-1].nan_to_num(posinf=1e9), pos_FK2[1:].nan_to_num(posinf=-1e9))
    j_FK = d_FKK.argmin(2)  # nearest in the next frame
    i_FK = d_FKK.argmin(1)  # nearest in this frame, for each spot of the next
    mutual = torch.gather(i_FK, 1, j_FK) == torch.arange(K)[None]
    ok = mutual & (torch.gather(d_FKK, 2, j_FK[..., None])[..., 0] <= radius) & (idx_FK[:-1] >= 0)
    ok &= ((torch.arange(n_frames - 1) + 1) % frames_per_block != 0)[:, None]  # not across blocks
    a = idx_FK[:-1][ok]
    b = torch.gather(idx_FK[1:], 1, j_FK)[ok]
    nxt[a], prev[b] = b, a
    return prev, nxt


def track_roots(prev: torch.Tensor) -> torch.Tensor:
    """(E,) index of the first spot of each spot's track, following ``prev`` links."""
    root = torch.arange(len(prev))
    while True:
        p = prev[root]
        step = p >= 0
        if not step.any():
            return root
        root = torch.where(step, p, root)


def roi_for_width(sigma_px: float) -> int:
    """The fit's ROI edge for spots of median width ``sigma_px``: odd, about 4 widths, 7 to 15 px (wider spots,
    e.g. an astigmatic PSF out of focus, lose photons and width outside a small ROI)."""
    return int(min(15, max(7, 2 * math.ceil(2 * sigma_px) + 1)))


def measure_spots(photons_BTHW: torch.Tensor, roi: int = 7, link_px: float = 1.0) -> Spots:
    """Detect, fit and link the spots of a movie sample (photons); see :class:`Spots`."""
    B, T = photons_BTHW.shape[:2]
    frame, theta = fit_spots(photons_BTHW, roi)
    order = torch.argsort(frame, stable=True)
    frame, theta = frame[order], theta[order].float()
    prev, nxt = link(frame, theta[:, :2], T, link_px)
    return Spots(frame, theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3], theta[:, 4], theta[:, 5],
                 prev, nxt, track_roots(prev), B * T)


#: Spots on for a whole frame (linked to both neighbours) needed to compare their photons.
MIN_MID = 30
#: ... and to compare the spread of their photons (with fewer, the flux sd keeps its first guess).
MIN_MID_SPREAD = 150


@dataclass
class SpotStats:
    """What the calibration compares between the user's movie and a simulated one.

    Attributes:
        per_frame: spots per frame. n: spots.
        phot_q: 25th, 50th and 75th percentile of the spots' photons.
        mid_q: the same over spots linked to both neighbours (on for their whole frame); None if fewer than
            :data:`MIN_MID`. n_mid: how many there are.
        sigma: median width sqrt(sx sy) of the brighter half of the spots, px.
        track_len: mean frames per track.
        track_phot: mean photons per track; over the photons of a spot on for a whole frame, about the on-time.
        astig: :class:`Astigmatism` of the brighter half's widths.
    """

    per_frame: float
    n: int
    phot_q: tuple
    mid_q: Optional[tuple]
    n_mid: int
    sigma: float
    track_len: float
    track_phot: float
    astig: "Astigmatism"


@dataclass
class Astigmatism:
    """What fitted (sx, sy) pairs say about the astigmatic model (:func:`decode_var.data.simulation.astigmatism`:
    ``sx = sigma_0 sqrt(1 + ((z + f) / d)^2)``, ``sy`` with ``z - f``; f = foc_shift, d = rl_range):

    - the narrowest widths (5th percentile of min(sx, sy)) are about ``sigma_0``: each axis is in focus at z = -+f;
    - where the two widths are equal (z = 0) both are ``sigma_0 sqrt(1 + (f/d)^2)``: with the narrowest, ``f / d``;
    - ``D = sx^2 - sy^2 = 4 z (f/d) sigma_0^2 / d`` grows with z: its spread over the emitters' z range gives d.

    Fitted widths are noisy, so these values are biased; the calibration compares them between the user's movie
    and a simulated one, where the bias cancels. Each is monotonic in its setting, so the comparison converges.

    Attributes:
        min_width, cross_width: px. d_spread: 5th to 95th percentile of D, px^2.
    """

    min_width: float
    cross_width: float
    d_spread: float

    @classmethod
    def of(cls, sx: torch.Tensor, sy: torch.Tensor) -> "Astigmatism":
        sx, sy = sx.double(), sy.double()
        D = sx ** 2 - sy ** 2
        near = torch.argsort((sx - sy).abs() / (sx + sy))[:max(10, len(sx) // 10)]  # the tenth nearest z = 0
        lo, hi = torch.quantile(D, torch.tensor([0.05, 0.95], dtype=torch.float64))
        return cls(float(torch.quantile(torch.minimum(sx, sy), 0.05)), float((sx[near] * sy[near]).sqrt().median()),
                   float(hi - lo))

    @property
    def ratio(self) -> float:
        """f / d from the crossing and the narrowest widths."""
        return math.sqrt(max((self.cross_width / self.min_width) ** 2 - 1, 1e-4))

    @property
    def d_per_ratio(self) -> float:
        """``D``'s spread over ``min_width^2``: 4 (f/d) (z range) / d for the model."""
        return self.d_spread / self.min_width ** 2

    def rl_range(self, z_range_nm: float) -> float:
        """d (nm) for emitters spread uniformly over ``z_range_nm`` (D's 5-95 % spread covers 0.9 of it)."""
        return 0.9 * z_range_nm * 4 * self.ratio / max(self.d_per_ratio, 1e-9)


def spot_stats(spots: Spots) -> SpotStats:
    """:class:`SpotStats` of fitted spots (raises ValueError when there are fewer than 20)."""
    n = len(spots.phot)
    if n < 20:
        raise ValueError(f"only {n} spots found")
    q = torch.tensor([0.25, 0.5, 0.75])
    phot_q = tuple(float(v) for v in torch.quantile(spots.phot, q))
    mid = (spots.prev >= 0) & (spots.next >= 0)
    mid_q = tuple(float(v) for v in torch.quantile(spots.phot[mid], q)) if int(mid.sum()) >= MIN_MID else None
    bright = spots.phot >= phot_q[1]
    sigma = float((spots.sx[bright] * spots.sy[bright]).sqrt().median())
    roots, inverse = torch.unique(spots.track, return_inverse=True)
    track_len = n / max(1, len(roots))
    track_phot = float(torch.zeros(len(roots)).index_add_(0, inverse, spots.phot.float()).mean())
    return SpotStats(n / spots.n_frames, n, phot_q, mid_q, int(mid.sum()), sigma, track_len, track_phot,
                     Astigmatism.of(spots.sx[bright], spots.sy[bright]))


@dataclass
class EmitterSettings:
    """The simulator's emitter settings: flux ``mu``, ``sig`` (photons per frame of full on-time),
    ``emitter_av`` (emitters on per frame of the measured frame size), ``lifetime`` (mean on-time, frames),
    the Gaussian PSF's in-focus width ``sigma_0`` (px; None: the PSF is given, e.g. a spline calibration) and
    its astigmatism ``foc_shift``, ``rl_range`` (nm; None: not estimated, a 2D PSF or given)."""

    mu: float
    sig: float
    emitter_av: float
    lifetime: float
    sigma_0: Optional[float] = None
    foc_shift: Optional[float] = None
    rl_range: Optional[float] = None


def _photons(stats: SpotStats, other: SpotStats) -> tuple:
    """The photon quartiles to compare: of full-frame spots where both movies have enough, else of all."""
    return (stats.mid_q, other.mid_q) if stats.mid_q and other.mid_q else (stats.phot_q, other.phot_q)


def first_guess(real: SpotStats, psf: str, z_range_nm: float = 1500.0) -> EmitterSettings:
    """Settings read off the measured values directly (biased; :func:`calibrate` corrects them).

    ``psf``: ``fixed`` (a calibration: no width estimated), ``2d`` (``sigma_0``) or ``astigmatic``
    (``sigma_0``, ``foc_shift``, ``rl_range``; ``z_range_nm``: the emitters' z range)."""
    q = real.mid_q or real.phot_q
    mu = q[1] if real.mid_q else q[2]
    cv = min(0.5, max(0.05, (q[2] - q[0]) / 1.349 / max(q[1], 1e-9)))
    s = EmitterSettings(mu, cv * mu, real.per_frame, max(0.3, real.track_phot / mu))
    if psf == "2d":
        s.sigma_0 = real.sigma
    elif psf == "astigmatic":
        d = real.astig.rl_range(z_range_nm)
        s.sigma_0, s.foc_shift, s.rl_range = real.astig.min_width, real.astig.ratio * d, d
    return s


def _step(factor: float, most: float = 1.4) -> float:
    """A calibration step's factor, at most ``most``-fold either way (noisy values must not throw it off)."""
    return min(most, max(1 / most, factor))


def update(s: EmitterSettings, real: SpotStats, sim: SpotStats) -> EmitterSettings:
    """One calibration step: each setting scaled by how far the simulated movie's value is from the real one.

    Flux by the photon medians, its spread by the relative interquartile ranges, the density by the spots
    per frame, the on-time by the photons per track (in spots on for a whole frame), the width by the median
    widths (an astigmatic PSF's narrowest); its f / d and d as :class:`Astigmatism` says."""
    (rq, sq) = _photons(real, sim)
    cv = s.sig / s.mu
    if min(real.n_mid, sim.n_mid) >= MIN_MID_SPREAD:
        cv *= ((rq[2] - rq[0]) / rq[1]) / max((sq[2] - sq[0]) / sq[1], 1e-6)
    mu = s.mu * _step(rq[1] / sq[1], 3.0)
    extra = (real.track_phot / rq[1]) / max(sim.track_phot / sq[1], 1e-6)  # photons per track, in full frames
    out = EmitterSettings(mu, min(1.0, max(0.0, cv)) * mu, s.emitter_av * _step(real.per_frame / max(sim.per_frame,
                                                                                                      1e-6), 3.0),
                          min(50.0, max(0.1, s.lifetime * _step(extra, 3.0))))
    if s.sigma_0 is not None:  # astigmatic: the narrowest widths (the median width also moves with d)
        out.sigma_0 = s.sigma_0 * _step(real.astig.min_width / sim.astig.min_width if s.rl_range is not None
                                        else real.sigma / sim.sigma)
    if s.rl_range is not None:  # f / d from crossing over narrowest widths, then d from D's spread at that f / d
        r0 = s.foc_shift / s.rl_range
        r = r0 * _step(real.astig.ratio / sim.astig.ratio)
        out.rl_range = s.rl_range * _step(sim.astig.d_per_ratio / real.astig.d_per_ratio * r / r0)
        out.foc_shift = r * out.rl_range
    return out


def _geometric_mean(settings: list) -> EmitterSettings:
    """Each setting's geometric mean over ``settings`` (None stays None)."""
    def gm(values):
        return None if values[0] is None else math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))

    names = EmitterSettings.__dataclass_fields__
    return EmitterSettings(**{k: gm([getattr(s, k) for s in settings]) for k in names})


def calibrate(real: SpotStats, start: EmitterSettings, measure: Callable[[EmitterSettings, int], SpotStats],
              rounds: int = 6, fixed: Optional[dict] = None) -> tuple[EmitterSettings, SpotStats, list]:
    """Refine ``start`` until ``measure(settings, seed)`` (the same measurement on a movie simulated with them)
    gives ``real``'s values: ``rounds`` steps of :func:`update`, then the geometric mean of the second half of
    the steps' settings (a simulated movie's values are noisy; the mean of several steps is less so).
    ``fixed``: settings that keep their value (given by the user).
    Returns the settings, the values of a movie simulated with them and the history [(settings, values), ...]."""
    fixed = fixed or {}
    s, history = replace(start, **fixed), []
    for k in range(rounds):
        sim = measure(s, k)
        history.append((s, sim))
        s = replace(update(s, real, sim), **fixed)
    steps = [h[0] for h in history[rounds // 2 + 1:]] + [s]
    s = _geometric_mean(steps)
    sim = measure(s, rounds)
    history.append((s, sim))
    return s, sim, history
