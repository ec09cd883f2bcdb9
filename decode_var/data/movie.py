"""Continuous movies: emitters that blink across frames, rendered with a PSF and a camera.

The training simulator (:mod:`decode_var.data.simulation`) makes independent windows of a few frames; a
movie is one long stretch, as a microscope records it: what ``decode-var-init`` compares a user's movie
with, what its tests estimate from, and what ``benchmarks/bench_movie.py`` fits.

Emitters follow DECODE's ``EmitterSamplerBlinking``: start times uniform on ``[-3 L, T + 3 L)``, on-times
exponential with mean ``L = lifetime_avg`` frames, a Poisson count ``density * span / (L + 1)`` (an
emitter touches ``L + 1`` frames on average, so about ``density`` are on per frame); a frame gets
``flux * (time on in that frame)`` photons, ``flux ~ N(mu, sig)`` clamped at ``intensity_th``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from decode_var.core.emitters import EmitterSet
from decode_var.data.simulation import Camera, Simulator

__all__ = ["blinking_emitters", "adu_camera", "Movie", "simulate_movie"]


def blinking_emitters(sim: Simulator, n_frames: int, density: float, generator: Optional[torch.Generator] = None):
    """Emitters of a continuous movie of ``n_frames`` frames with the flux, on-time and extent of ``sim``.

    Returns xyz (P, 3) px / px / nm, phot (P,) photons, frame (P,), id (P,): one row per emitter and frame
    it is on in. Draws from ``generator`` (CPU; None = the global RNG).
    """
    g, L = generator, sim.lifetime
    t_lo, t_hi = -3 * L, n_frames + 3 * L
    n = int(torch.poisson(torch.tensor(density * (t_hi - t_lo) / (L + 1)), generator=g))
    extent = sim.extent.cpu()
    span = extent[:, 1] - extent[:, 0]
    xyz_E3 = extent[:, 0] + torch.rand(n, 3, generator=g) * span
    flux_E = torch.clamp(sim.mu + sim.sig * torch.randn(n, generator=g), min=sim.intensity_th)
    t0_E = t_lo + torch.rand(n, generator=g) * (t_hi - t_lo)
    te_E = t0_E + torch.empty(n).exponential_(1 / L, generator=g)
    f0_E = torch.floor(t0_E).long()
    n_span_E = torch.floor(te_E).long() - f0_E + 1
    e_P = torch.repeat_interleave(torch.arange(n), n_span_E)
    first_P = torch.repeat_interleave(torch.cumsum(n_span_E, 0) - n_span_E, n_span_E)
    frame_P = f0_E[e_P] + torch.arange(len(e_P)) - first_P
    on_P = torch.minimum(te_E[e_P], frame_P + 1.0) - torch.maximum(t0_E[e_P], frame_P.float())
    keep = (frame_P >= 0) & (frame_P < n_frames) & (on_P > 0)
    e_P, frame_P, on_P = e_P[keep], frame_P[keep], on_P[keep]
    return xyz_E3[e_P], flux_E[e_P] * on_P, frame_P, e_P


def adu_camera(camera: Camera) -> Camera:
    """The same camera giving raw ADU (what a TIFF from the microscope holds), not photons."""
    c = camera
    return Camera(c.qe, c.spur, c.em_gain, c.e_per_adu, c.baseline, c.read_sigma, photon_units=False)


@dataclass
class Movie:
    """A simulated movie.

    Attributes:
        adu_THW: camera frames, ADU (float; a TIFF would hold them as uint16).
        em: the emitters, one row per emitter and frame it is on in (px, px, nm; photons in that frame).
        bg_THW: the true background, photons / px.
    """

    adu_THW: torch.Tensor
    em: EmitterSet
    bg_THW: torch.Tensor


def simulate_movie(sim: Simulator, bg_THW: torch.Tensor, density: Optional[float] = None,
                   generator: Optional[torch.Generator] = None) -> Movie:
    """A movie of ``len(bg_THW)`` frames with the emitters, PSF and camera of ``sim`` on the background
    ``bg_THW`` (photons / px; its frame size is the movie's).

    ``density``: emitters on per frame (default: the middle of ``sim``'s ``emitter_av``). Draws from
    ``generator`` (CPU; None = the global RNG). Runs on the CPU.
    """
    n_frames = int(bg_THW.shape[0])
    density = 0.5 * (sim.av_lo + sim.av_hi) if density is None else float(density)
    xyz, phot, frame, ident = blinking_emitters(sim, n_frames, density, generator)
    expected_THW = sim.psf.forward(xyz, phot, frame, n_frames) + bg_THW
    adu_THW = adu_camera(sim.camera).forward(expected_THW, generator)
    em = EmitterSet(xyz, phot, frame, id=ident, px_size=sim.px_size)
    return Movie(adu_THW, em, bg_THW)
