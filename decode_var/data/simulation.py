"""Built-in training-data simulator with DECODE 0.10's conventions.

One *sample* is a window of ``channels_in`` consecutive frames (3 by default, frames -1, 0, 1);
the target belongs to the centre frame, as in DECODE's ``SMLMLiveSampleDataset``.

- Emitters blink (DECODE's ``EmitterSamplerBlinking``): start times uniform over the window
  widened by 3 mean lifetimes, exponential on-times with mean ``lifetime_avg`` frames, the number
  Poisson with mean ``emitter_av * frames / (lifetime_avg + 1)`` so that about ``emitter_av``
  emitters are on per frame. A frame gets ``flux * (time on in that frame)`` photons.
  ``emitter_av`` may be a range [low, high]: each sample draws its own density, uniformly.
- Positions uniform in ``emitter_extent`` (x, y in px, z in nm); flux ~ N(mu, sig), clamped at
  ``intensity_th``.
- Astigmatic Gaussian PSF (DECODE's ``GaussianPSF``): the pixel-integrated Gaussian with
  ``sigma_x = sigma_0 sqrt(1 + ((z + foc_shift) / rl_range)^2)``, ``sigma_y`` with ``z - foc_shift``.
- Background (:class:`Background`), photons / px: a uniform level drawn from ``bg_uniform`` for
  every frame of a window independently (DECODE's ``UniformBackground`` samples one value per
  frame), plus, optionally, a spatially smooth Perlin field per window (DECODE 0.9's
  ``bg_perlin_*`` keys) whose strength drifts linearly across the window (``VAR.bg_drift``).
- Camera (DECODE's ``Photon2Camera``): Poisson(qe * x + spur), Gamma EM gain, Gaussian read noise,
  / e_per_adu, floor, + baseline, clamp >= 0; then back to photons when ``convert2photons``.

All randomness of one call comes from the ``seed`` it is given, so a batch is a pure function of
(seed, batch size, device): training can be resumed and compared bit for bit.

**Device.** Everything above runs in torch on ``Hardware.device_simulation`` (:meth:`Simulator.parse`;
``cuda`` on a machine without CUDA falls back to the CPU with a warning, see
:func:`decode_var.core.devices.resolve_device`): tensors are created on that device and every draw comes
from a ``torch.Generator`` on that device seeded with the batch seed, so the global RNG is never touched
and a batch can be made in a background thread (:mod:`decode_var.training.prefetch`). On the CPU the
generator is the same Mersenne twister, seeded the same way, as the global RNG under ``fork_rng`` that
earlier versions used: CPU batches are unchanged bit for bit (``tests/test_device_data.py``). On a GPU,
batches are reproducible for a given seed and device, but differ from the CPU's (another generator).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from decode_var.core.devices import resolve_device
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError
from decode_var.core.log import warn
from decode_var.data.accumulate import accumulate, frame_slots
from decode_var.data.camera_maps import CameraMaps
from decode_var.data.spline_psf import SplinePSF
from decode_var.data.targets import frame_grid


@dataclass
class Batch:
    """One simulated batch.

    Attributes:
        frames_NCHW: camera frames, photons (or ADU when not converted), C = frame window.
        em: emitters of the centre frames, frame_ix = sample index, xy in px, z in nm.
        bg_NHW: true background of the centre frames, photons / px.
        em_all: emitters of every window frame, frame_ix = sample * C + window position.
        bg_NCHW: true background of every window frame, photons / px (None where not kept).
    """

    frames_NCHW: torch.Tensor
    em: EmitterSet
    bg_NHW: torch.Tensor
    em_all: EmitterSet
    bg_NCHW: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.frames_NCHW.device

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The same batch on ``device`` (e.g. the emitters back on the CPU for matching)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.frames_NCHW), self.em.to(device, non_blocking), move(self.bg_NHW),
                     self.em_all.to(device, non_blocking), move(self.bg_NCHW))


def astigmatism(z_nm: torch.Tensor, sigma_0: float, foc_shift: float, rl_range: float) -> torch.Tensor:
    """(E, 2) Gaussian widths in px along x and y for z in nm (DECODE's Gaussian beam model)."""
    sx = sigma_0 * torch.sqrt(1 + ((z_nm + foc_shift) / rl_range) ** 2)
    sy = sigma_0 * torch.sqrt(1 + ((z_nm - foc_shift) / rl_range) ** 2)
    return torch.stack([sx, sy], 1)


class GaussianPSF:
    """Pixel-integrated (astigmatic) Gaussian PSF.

    Args:
        xextent, yextent: field of view in px; img_shape: frame size in px.
        sigma_0: in-focus width in px. foc_shift, rl_range: nm (3D only).
        mode_3d: use the astigmatic widths; False = sigma_0 everywhere.
    """

    def __init__(self, xextent, yextent, img_shape, sigma_0: float = 1.0, foc_shift: float = 250.0,
                 rl_range: float = 280.0, mode_3d: bool = True):
        self.img_shape = tuple(int(s) for s in img_shape)
        self.edge_x, self.edge_y, _, _ = frame_grid(self.img_shape, xextent, yextent)
        self.sigma_0, self.foc_shift, self.rl_range, self.mode_3d = sigma_0, foc_shift, rl_range, mode_3d
        self._edges = {}  # device -> (edge_x, edge_y) on it

    def edges(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel edges in px along x and y on ``device`` (copied there once)."""
        key = str(device)
        if key not in self._edges:
            self._edges[key] = (self.edge_x.to(device), self.edge_y.to(device))
        return self._edges[key]

    @classmethod
    def parse(cls, param):
        g = param.VAR.gaussian_psf
        ext = param.Simulation.psf_extent
        return cls(ext[0], ext[1], param.Simulation.img_size, g.sigma_0, g.foc_shift, g.rl_range, g.mode_3d)

    def sigma(self, z_nm: torch.Tensor) -> torch.Tensor:
        if self.mode_3d:
            return astigmatism(z_nm, self.sigma_0, self.foc_shift, self.rl_range)
        return torch.full((z_nm.numel(), 2), float(self.sigma_0), device=z_nm.device)

    def forward(self, xyz: torch.Tensor, phot: torch.Tensor, frame_ix: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Expected photons per px, (n_frames, sx, sy), from (E, 3) positions (px, px, nm), on xyz's device."""
        frames = torch.zeros(n_frames, *self.img_shape, device=xyz.device)
        if xyz.size(0) == 0:
            return frames
        edge_x, edge_y = self.edges(xyz.device)
        sig = self.sigma(xyz[:, 2]) * math.sqrt(2)
        gx = torch.erf((edge_x[None, 1:] - xyz[:, :1]) / sig[:, :1]) - \
            torch.erf((edge_x[None, :-1] - xyz[:, :1]) / sig[:, :1])
        gy = torch.erf((edge_y[None, 1:] - xyz[:, 1:2]) / sig[:, 1:]) - \
            torch.erf((edge_y[None, :-1] - xyz[:, 1:2]) / sig[:, 1:])
        gx = gx * (phot[:, None] / 4)
        # on GPUs: the emitters of rank 0 in their frame first, then rank 1, ... (see accumulate)
        return accumulate(frames, frame_ix, gx[:, :, None] * gy[:, None, :], lambda: frame_slots(frame_ix))


def perlin_NHW(n: int, img_shape, res: int, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
    """(n, H, W) smooth gradient noise in [0, 1], one independent field per frame, on ``device``.

    Draws from ``generator`` (on ``device``; None = the global RNG).

    DECODE 0.9's ``_PerlinBackground``: random unit gradients on a ``(res + 1)^2`` lattice spread over the
    frame, quintic fade, ``(sqrt(2) * noise + 1) / 2``; features are about ``img_size / res`` px wide.
    Pixel i is sampled at its centre, so any frame size works (DECODE required multiples of ``res``).
    """
    H, W = (int(v) for v in img_shape)
    angles_NRR = 2 * math.pi * torch.rand(n, res + 1, res + 1, generator=generator, device=device)
    grad_NRR2 = torch.stack([torch.cos(angles_NRR), torch.sin(angles_NRR)], -1)
    u_H = (torch.arange(H, dtype=torch.float32, device=device) + 0.5) * (res / H)
    v_W = (torch.arange(W, dtype=torch.float32, device=device) + 0.5) * (res / W)
    i_H, j_W = u_H.floor().long().clamp(max=res - 1), v_W.floor().long().clamp(max=res - 1)
    fu_H, fv_W = u_H - i_H, v_W - j_W

    def corner(di: int, dj: int) -> torch.Tensor:
        g_NHW2 = grad_NRR2[:, i_H + di][:, :, j_W + dj]
        return g_NHW2[..., 0] * (fu_H - di)[None, :, None] + g_NHW2[..., 1] * (fv_W - dj)[None, None, :]

    def fade(t):
        return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3

    tu, tv = fade(fu_H)[None, :, None], fade(fv_W)[None, None, :]
    noise_NHW = torch.lerp(torch.lerp(corner(0, 0), corner(1, 0), tu), torch.lerp(corner(0, 1), corner(1, 1), tu), tv)
    return ((math.sqrt(2) * noise_NHW + 1) / 2).clamp(0.0, 1.0)


class Background:
    """Background of the frames of a window, photons / px.

    Args:
        bg_uniform: a value or [low, high]; every frame draws its own level uniformly (DECODE's
            ``UniformBackground`` on a frame stack: one value per frame).
        frame_window: frames per window (C).
        perlin_amplitude: peak of the smooth field, photons / px; a value, or one per lattice scale
            (DECODE 0.9's multi-scale Perlin); 0 = none.
        perlin_scale: lattice cells across the frame, one per amplitude (features ~ img_size / scale px).
        perlin_draw_amps: scale each field by U(0, 1) per window (DECODE 0.9's ``bg_perlin_draw_amps``).
        drift: the smooth field of window frame c is multiplied by ``1 + s (c - centre)`` with s ~ U(-drift,
            drift) per window: a slow rise or fall of the structured background; the centre frame keeps 1.
    """

    def __init__(self, bg_uniform, frame_window: int, perlin_amplitude=0.0, perlin_scale=4,
                 perlin_draw_amps: bool = False, drift: float = 0.0):
        bg = bg_uniform if isinstance(bg_uniform, (list, tuple)) else (bg_uniform, bg_uniform)
        self.lo, self.hi = float(bg[0]), float(bg[1])
        self.frame_window = int(frame_window)
        amps = perlin_amplitude if isinstance(perlin_amplitude, (list, tuple)) else [perlin_amplitude]
        scales = perlin_scale if isinstance(perlin_scale, (list, tuple)) else [perlin_scale] * len(amps)
        self.perlin = [(float(a), int(s)) for a, s in zip(amps, scales) if a]
        self.draw_amps, self.drift = bool(perlin_draw_amps), float(drift)

    @classmethod
    def parse(cls, param):
        sim = param.Simulation
        return cls(sim.bg_uniform, param.HyperParameter.channels_in,
                   sim.get("bg_perlin_amplitude") or 0.0, sim.get("bg_perlin_scale") or 4,
                   bool(sim.get("bg_perlin_draw_amps")), param.VAR.get("bg_drift") or 0.0)

    def sample(self, n_samples: int, img_shape, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
        """(N, C, H, W) background of ``n_samples`` windows of (H, W) px frames, photons / px, on ``device``.

        Draws from ``generator`` (on ``device``; None = the global RNG).
        """
        C, img_shape = self.frame_window, tuple(int(v) for v in img_shape)
        g, dev = generator, device
        level_NC = self.lo + torch.rand(n_samples, C, generator=g, device=dev) * (self.hi - self.lo)
        bg_NCHW = level_NC[:, :, None, None].expand(n_samples, C, *img_shape)
        if not self.perlin:
            return bg_NCHW.clone()
        field_NHW = torch.zeros(n_samples, *img_shape, device=dev)
        for amp, res in self.perlin:
            draw_N = torch.rand(n_samples, generator=g, device=dev) if self.draw_amps else \
                torch.ones(n_samples, device=dev)
            field_NHW = field_NHW + (amp * draw_N)[:, None, None] * perlin_NHW(n_samples, img_shape, res, g, dev)
        slope_N = (2 * torch.rand(n_samples, generator=g, device=dev) - 1) * self.drift
        offset_C = torch.arange(C, dtype=torch.float32, device=dev) - (C - 1) // 2
        factor_NC = (1 + slope_N[:, None] * offset_C[None]).clamp(min=0.0)
        return bg_NCHW + factor_NC[:, :, None, None] * field_NHW[:, None]


class Camera:
    """DECODE's Photon2Camera. ``em_gain=None`` is an sCMOS camera (no gain, no excess noise)."""

    def __init__(self, qe: float, spur_noise: float, em_gain: Optional[float], e_per_adu: float, baseline: float,
                 read_sigma: float, photon_units: bool = True, maps: Optional[CameraMaps] = None,
                 frame_window: int = 1):
        """``maps``: per-pixel sCMOS maps of the chip (:mod:`decode_var.data.camera_maps`), which replace
        ``baseline``, ``e_per_adu`` and ``read_sigma``; None = the scalar camera. ``frame_window``: the
        frames of one sample, which share one window of the chip in :meth:`forward`."""
        self.qe, self.spur, self.em_gain = qe, spur_noise, em_gain
        self.e_per_adu, self.baseline, self.read_sigma = e_per_adu, baseline, read_sigma
        self.photon_units = photon_units
        self.maps, self.frame_window = maps, int(frame_window)

    @classmethod
    def parse(cls, param):
        c = param.Camera
        return cls(c.qe, c.spur_noise, c.em_gain, c.e_per_adu, c.baseline, c.read_sigma, c.convert2photons,
                   maps=CameraMaps.parse(c), frame_window=param.HyperParameter.channels_in)

    def _electrons(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Expected photons -> photo-electrons (with spurious charge and EM gain): shot and excess noise."""
        electrons = torch.poisson(torch.clamp(x, min=0.0) * self.qe + self.spur, generator=generator)
        if self.em_gain is not None:
            gamma = torch._standard_gamma(electrons.clamp(min=1e-12), generator=generator)
            electrons = gamma * self.em_gain * (electrons > 0)
        return electrons

    def _forward_maps(self, x_FHW: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """:meth:`forward` with per-pixel maps: ADU = floor(e- / gain + N(0, read_var)) + offset, per pixel.

        Each sample (``frame_window`` consecutive frames) sits at its own place on the chip, drawn uniformly
        from ``generator``, so the model sees the chip's variety of pixels.
        """
        electrons = self._electrons(x_FHW, generator)
        hw, n_frames = tuple(x_FHW.shape[-2:]), x_FHW.shape[0] if x_FHW.dim() == 3 else 1
        per = self.frame_window if n_frames % self.frame_window == 0 else 1
        maps = self.maps.random_windows(n_frames // per, hw, x_FHW.device, generator)
        offset, gain, var = (m.repeat_interleave(per, 0).reshape(x_FHW.shape) for m in maps)
        noise = torch.randn(electrons.shape, generator=generator, dtype=electrons.dtype, device=electrons.device)
        adu = torch.clamp(torch.floor(electrons / gain + var.sqrt() * noise) + offset, min=0.0)
        return self._photons(adu, offset, gain) if self.photon_units else adu

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Expected photons -> noisy camera frame, on x's device (photons, or ADU without ``photon_units``).

        Draws from ``generator`` (on x's device; None = the global torch RNG). With maps, ``x`` is
        (frames, H, W) and each sample of ``frame_window`` frames gets a random window of the chip.
        """
        if self.maps is not None:
            return self._forward_maps(x, generator)
        electrons = torch.poisson(torch.clamp(x, min=0.0) * self.qe + self.spur, generator=generator)
        if self.em_gain is not None:
            # Gamma(shape = electrons, scale = gain); shape 0 gives 0
            gamma = torch._standard_gamma(electrons.clamp(min=1e-12), generator=generator)
            electrons = gamma * self.em_gain * (electrons > 0)
        noise = torch.randn(electrons.shape, generator=generator, dtype=electrons.dtype, device=electrons.device)
        electrons = electrons + self.read_sigma * noise
        adu = torch.clamp(torch.floor(electrons / self.e_per_adu) + self.baseline, min=0.0)
        return self.backward(adu) if self.photon_units else adu

    def backward(self, adu: torch.Tensor, origin=None) -> torch.Tensor:
        """ADU -> photons (expected value); ``adu`` (..., H, W).

        With maps, each frame is the (H, W) window of the chip at ``origin`` = [x0, y0] px (default
        ``Camera.roi_origin``): its per-pixel offset and gain convert it.
        """
        if self.maps is not None:
            offset_HW, gain_HW, _ = self.maps.window(tuple(adu.shape[-2:]), adu.device, origin)
            return self._photons(adu, offset_HW, gain_HW)
        out = (adu - self.baseline) * self.e_per_adu
        if self.em_gain is not None:
            out = out / self.em_gain
        return (out - self.spur) / self.qe

    def _photons(self, adu: torch.Tensor, offset: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """ADU -> photons with per-pixel offset (ADU) and gain (e- / ADU), broadcast over ``adu``."""
        out = (adu - offset) * gain
        if self.em_gain is not None:
            out = out / self.em_gain
        return (out - self.spur) / self.qe


class Simulator:
    """Samples of ``frame_window`` frames with their centre-frame emitters and background.

    Args:
        psf: an object with ``forward(xyz, phot, frame_ix, n_frames)`` (photons / px).
        camera: a :class:`Camera`.
        emitter_extent: [[x0, x1], [y0, y1], [z0, z1]] in px, px, nm.
        intensity_mu_sig: flux mean and sd (photons per frame when fully on).
        emitter_av: mean emitters on per frame; [low, high] draws it per sample, uniformly.
        lifetime_avg: mean on-time (frames).
        bg_uniform: photons / px, a value or [low, high], drawn per frame; or a :class:`Background`.
        frame_window: 1 or 3. intensity_th: minimum flux. px_size: nm per px (for the EmitterSet).
        device: where batches are made and live (frames, emitters, background).
    """

    def __init__(self, psf, camera: Camera, emitter_extent, intensity_mu_sig, emitter_av,
                 lifetime_avg: float, bg_uniform, frame_window: int = 3, intensity_th: Optional[float] = None,
                 px_size=None, device="cpu"):
        self.psf, self.camera = psf, camera
        self.device = torch.device(device)
        self.extent = torch.tensor(emitter_extent, dtype=torch.float32, device=self.device)
        self.mu, self.sig = float(intensity_mu_sig[0]), float(intensity_mu_sig[1])
        av = emitter_av if isinstance(emitter_av, (list, tuple)) else (emitter_av, emitter_av)
        self.av_lo, self.av_hi = float(av[0]), float(av[1])
        self.lifetime = float(lifetime_avg)
        self.frame_window = int(frame_window)
        self.background = bg_uniform if isinstance(bg_uniform, Background) else \
            Background(bg_uniform, self.frame_window)
        self.intensity_th = 1e-8 if intensity_th is None else float(intensity_th)
        self.px_size = px_size
        self.half = (self.frame_window - 1) // 2

    @classmethod
    def parse(cls, param, psf=None, device=None):
        """From the param file.

        Args:
            psf: a PSF from outside (the ``decode`` backend's DECODE PSF); None = the package's own
                (``VAR.psf``: gaussian or spline).
            device: where to simulate; None = ``Hardware.device_simulation`` with the package's own PSF
                (``cuda`` without CUDA: the CPU, with a warning), and the CPU with a PSF from outside
                (the ``decode`` backend keeps its data on the CPU, with its DECODE camera).
        """
        sim = param.Simulation
        if device is None:
            device = cls._parse_device(param, own_psf=psf is None)
        if psf is None and param.VAR.psf == "spline":
            psf = SplinePSF.parse(param)
        if psf is None:
            psf = GaussianPSF.parse(param)
        if sim.density is not None:
            raise ParamError("Simulation.density is not supported by decode-var's simulator; "
                             "set Simulation.emitter_av (emitters per frame) and leave density empty.")
        return cls(psf, Camera.parse(param), sim.emitter_extent, sim.intensity_mu_sig, sim.emitter_av,
                   sim.lifetime_avg, Background.parse(param), param.HyperParameter.channels_in, sim.intensity_th,
                   param.Camera.px_size, device=device)

    @staticmethod
    def _parse_device(param, own_psf: bool) -> torch.device:
        name = param.Hardware.get("device_simulation") or "cpu"
        if own_psf:
            return resolve_device(name, "Hardware.device_simulation")
        if str(name).strip() != "cpu":
            warn(f"Hardware.device_simulation is {name!r}, but this simulator has a PSF from outside (the decode "
                 "backend's DECODE PSF and camera): its data is made on the CPU. Set VAR.backend: builtin to simulate "
                 "on the GPU.")
        return torch.device("cpu")

    def _emitters(self, n_samples: int, g: Optional[torch.Generator] = None):
        """Blinking emitters of every window frame: xyz (P, 3), phot (P,), frame (P,) global, id (P,).

        Draws from ``g`` (on the simulator's device; None = the global RNG).
        """
        dev = self.device
        lo, hi = -self.half - 3 * self.lifetime, self.half + 3 * self.lifetime
        n_frames_plus = hi - lo + 1
        if self.av_hi > self.av_lo:  # one density per sample; a fixed density draws nothing here
            av_N = self.av_lo + torch.rand(n_samples, generator=g, device=dev) * (self.av_hi - self.av_lo)
        else:
            av_N = torch.full((n_samples,), self.av_lo, device=dev)
        counts = torch.poisson(av_N * (n_frames_plus / (self.lifetime + 1)), generator=g).long()
        n = int(counts.sum())
        sample = torch.repeat_interleave(torch.arange(n_samples, device=dev), counts, output_size=n)
        span = self.extent[:, 1] - self.extent[:, 0]
        xyz = self.extent[:, 0] + torch.rand(n, 3, generator=g, device=dev) * span
        flux = torch.clamp(self.mu + self.sig * torch.randn(n, generator=g, device=dev), min=self.intensity_th)
        t0 = lo + torch.rand(n, generator=g, device=dev) * (hi - lo)
        te = t0 + torch.empty(n, device=dev).exponential_(1 / self.lifetime, generator=g)
        window = torch.arange(-self.half, self.half + 1, dtype=torch.float32, device=dev)
        on_E_F = (torch.minimum(te[:, None], window[None] + 1) - torch.maximum(t0[:, None], window[None])).clamp(min=0)
        e, f = torch.nonzero(on_E_F > 0, as_tuple=True)
        frame = sample[e] * self.frame_window + f
        return xyz[e], flux[e] * on_E_F[e, f], frame, e

    @property
    def thread_safe(self) -> bool:
        """Batches can be made in a thread next to a training step: nothing draws from the global RNG
        (False with a camera from outside, the ``decode`` backend's DECODE camera)."""
        return isinstance(self.camera, Camera)

    @contextlib.contextmanager
    def _rng(self, seed: int):
        """The random source of one batch: a generator on the simulator's device seeded with ``seed``.

        The global RNG is left alone, so batches can be made in a thread next to a training step. A
        camera from outside (the ``decode`` backend's DECODE camera draws from the global RNG) gets the
        global CPU RNG seeded with ``seed`` under ``fork_rng`` instead, all draws from that one stream,
        as before; that path is not thread-safe (use worker processes there).
        """
        if isinstance(self.camera, Camera):
            yield torch.Generator(device=self.device).manual_seed(int(seed))
            return
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            yield torch.default_generator if self.device.type == "cpu" else \
                torch.Generator(device=self.device).manual_seed(int(seed))

    def sample(self, n_samples: int, seed: int) -> Batch:
        """Simulate ``n_samples`` windows on the simulator's device; the result depends only on (seed,
        n_samples, device)."""
        with self._rng(seed) as g:
            xyz, phot, frame, ident = self._emitters(n_samples, g)
            n_frames = n_samples * self.frame_window
            expected = self.psf.forward(xyz, phot, frame, n_frames)
            bg_NCHW = self.background.sample(n_samples, expected.shape[-2:], g, self.device)
            x = expected + bg_NCHW.reshape(expected.shape)
            frames = self.camera.forward(x, g) if isinstance(self.camera, Camera) else self.camera.forward(x)
        frames_NCHW = frames.view(n_samples, self.frame_window, *frames.shape[-2:])
        centre = (frame % self.frame_window) == self.half
        em_all = EmitterSet(xyz, phot, frame, id=ident, px_size=self.px_size)
        em = EmitterSet(xyz[centre], phot[centre], frame[centre] // self.frame_window, id=ident[centre],
                        px_size=self.px_size)
        bg_NHW = bg_NCHW[:, self.half].clone()
        return Batch(frames_NCHW, em, bg_NHW, em_all, bg_NCHW)

    def sample_seeded(self, seeds) -> Batch:
        """One window per seed: sample i is ``sample(1, seeds[i])``, so it depends only on its own seed.

        Distributed training gives every sample of the global batch its own seed; a rank simulates
        its slice, and any split of the global batch over ranks yields the same samples.
        """
        parts = [self.sample(1, int(s)) for s in seeds]
        # emitter ids restart at 0 in every sample; shift them so that they stay unique in the batch
        offset = 0
        for b in parts:
            b.em.id, b.em_all.id = b.em.id + offset, b.em_all.id + offset
            if len(b.em_all):
                offset = int(b.em_all.id.max()) + 1
        return Batch(torch.cat([b.frames_NCHW for b in parts], 0),
                     EmitterSet.cat([b.em for b in parts], step_frame_ix=1),
                     torch.cat([b.bg_NHW for b in parts], 0),
                     EmitterSet.cat([b.em_all for b in parts], step_frame_ix=self.frame_window),
                     torch.cat([b.bg_NCHW for b in parts], 0))


class FrameScale:
    """Camera frames (photons) -> network input: (x - input_offset) / input_scale (DECODE's AmplitudeRescale)."""

    def __init__(self, scale: float, offset: float):
        self.scale, self.offset = float(scale), float(offset)

    @classmethod
    def parse(cls, param):
        return cls(param.Scaling.input_scale, param.Scaling.input_offset)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames - self.offset) / self.scale

    __call__ = forward


@dataclass(frozen=True)
class FrameSettings:
    """What fitting needs of the frames and the trained volume, parsed once from the param (:meth:`parse`).

    Attributes:
        channels_in: frames per network input window (``HyperParameter.channels_in``).
        convert2photons: the frames are raw ADU, converted to photons with the camera (``Camera.convert2photons``).
        baseline: the camera's offset, ADU (``Camera.baseline``).
        px_size: (x, y) nm per px (``Camera.px_size``; DECODE's x = first image axis), or None.
        z_range: (lo, hi) nm, the trained z range (``Simulation.emitter_extent`` z).
    """

    channels_in: int
    convert2photons: bool
    baseline: float
    px_size: Optional[tuple]
    z_range: tuple

    @classmethod
    def parse(cls, param) -> "FrameSettings":
        c = param.Camera
        z_lo, z_hi = param.Simulation.emitter_extent[2]
        return cls(int(param.HyperParameter.channels_in), bool(c.convert2photons), c.baseline,
                   None if c.px_size is None else tuple(c.px_size), (z_lo, z_hi))
