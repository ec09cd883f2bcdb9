"""Run a trained model on frames: camera frames -> network input -> finest map -> emitters.

Shared by ``decode-var-eval`` and ``decode-var-fit``. The chain follows DECODE's ``Infer`` and
post-processing: frames in photons are scaled like in training (``(x - input_offset) /
input_scale``), the model's eval output (finest scale, p after the sigmoid) is rescaled to
photons / px offsets / nm / photons per px and post-processed on the finest grid.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from decode_var.training.checkpoint import load_model_weights
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError, ShapeError
from decode_var.core.scales import Scale, ScaleSchedule
from decode_var.evaluation.model_card import check_camera
from decode_var.training.components import build
from decode_var.core.log import warn
from decode_var.nn.sparse import DEFAULT_THRESHOLD, sparse_forward, supports_sparse


#: Share of the summed module outputs of a forward pass that is resident at its peak, with margin.
#: Measured for the quickstart VARMultiScale at 256 x 256 px on the CPU: the peak resident memory of
#: ``decode-var-fit`` grows by 131 MiB per window of the batch (batches 1, 4, 8), while its module
#: outputs sum to 499 MiB per window: a share of 0.26. 0.35 leaves a third of margin;
#: ``benchmarks/bench_fit.py`` reports the resulting peak memory.
LIVE_SHARE = 0.35

#: Localizations further than this share of the trained z range (``Simulation.emitter_extent`` z) beyond
#: either end are dropped (:meth:`Predictor.inside`): 0.2 of the quickstart's 1,500 nm is 300 nm.
Z_MARGIN_SHARE = 0.2


class Predictor:
    """A trained model with the processing around it.

    The frame size is taken from the frames, not from the param: a model trained on 40 x 40 px
    windows fits frames of any size (square or not). Post-processing, cell centres and the field of
    view are built per frame size (:meth:`output_grid`), with the param's pixel origin and width
    (``Simulation.psf_extent``; by default input pixel ``i`` is centred on ``i``).

    Args:
        param: the experiment's param (``param_run.yaml``).
        model_path: ``model.pt`` (or ``ckpt.pt``).
        device: torch device string.
        trusted: allow arbitrary unpickling of the model file (only for files you trust).
        sparse: compute the finer scales only around the coarse cells whose detection probability passes
            ``sparse_threshold`` (:mod:`decode_var.nn.sparse`; models without coarse scales run dense).
            False (the default): every scale on every pixel, as in training. The same localizations; sparse is
            faster only on one thread at low density (1.4x at 1 emitter per 40 x 40 px, 256 x 256 px frames)
            and slower on two (docs/fitting.md, sparse inference). A batch whose planned cells would cost
            ``sparse_max_cost`` times the dense finer scales or more runs them dense (1: the faster path;
            ``inf``: always sparse).
    """

    def __init__(self, param, model_path, device: str = "cpu", trusted: bool = False, sparse: bool = False,
                 sparse_threshold: float = DEFAULT_THRESHOLD, sparse_max_cost: float = 1.0):
        self.device = torch.device(device)
        # the parts of the training run (the composition root): the task's output units and post-processing,
        # so that every model that trains also fits (six-channel maps, DECODE's SigmaMUNet with its sigmas)
        self.parts = build(param)
        self.backend, self.model, self.task = self.parts.backend, self.parts.model, self.parts.task
        load_model_weights(self.model, model_path, trusted=trusted)
        self.card = check_camera(self.parts.camera_record, model_path)  # warns where the camera is not the training one (issue 27)
        self.model.to(self.device).eval()
        # channels-last convolutions: 1.27x the frames/s of the quickstart model at 256 x 256 px on this
        # project's CPU, positions within 2e-5 px of the default layout (docs/fitting.md, speed)
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.schedule = self.parts.schedule  # the model's own
        self.frame_scale, self.camera = self.parts.frame_scale, self.parts.camera
        self.frames = self.parts.frames  # units, window and pixel size of the frames, the trained z range
        self.channels_in = self.frames.channels_in
        self._grids: dict = {}
        self._posts: dict = {}
        self._act_bytes_per_px: Optional[float] = None
        self._forward = self.model
        self._fixed_n: Optional[int] = None
        self.sparse_threshold = float(sparse_threshold) if sparse and supports_sparse(self.model) else None
        self.sparse_max_cost = float(sparse_max_cost)

    def compile(self, batch_size: int) -> None:
        """Run the model through ``torch.compile`` (about 2x on the CPU at 256 x 256 px, after a compile
        of a minute or two: worth it for long stacks). Batches are padded to ``batch_size`` so that one
        graph serves the whole stack. Falls back to eager mode, with a warning, if compiling fails
        (e.g. no C++ compiler). A compiled model runs dense (the sparse path's cell sets change shape from
        batch to batch)."""
        self._forward = torch.compile(self.model, dynamic=False)
        self._fixed_n = int(batch_size)

    def _run_model(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self._fixed_n is None and self.sparse_threshold is not None:
            return sparse_forward(self.model, x, self.sparse_threshold, max_cost=self.sparse_max_cost)
        if self._fixed_n is None:
            return self.model(x)
        if n < self._fixed_n:  # the last batch: repeat its last window, drop the extra outputs
            x = torch.cat([x, x[-1:].expand(self._fixed_n - n, *x.shape[1:])])
        try:
            return self._forward(x)[:n]
        except Exception as err:  # torch's compile stack raises many types (BackendCompilerFailed, ...)
            warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running the model without it.")
            self._forward, self._fixed_n = self.model, None
            return self.model(x[:n])

    # ------------------------------------------------------------------ frame geometry
    def output_grid(self, hw: Sequence[int]) -> tuple[Scale, tuple[int, int]]:
        """(finest output grid, network frame size) for frames of ``hw`` = (size_x, size_y) px.

        The grid covers the frame's field of view: it starts where the training field of view
        starts (``Simulation.psf_extent``, default -0.5) with the training pixel width, and spans
        ``hw`` pixels. When the finest factor does not give a whole number of cells on ``hw``
        (e.g. 0.5 on an odd size), the frames are padded at the high-x / high-y border to the next
        size that does (``network_hw``) and emitters outside the frame are dropped.
        """
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self._grids:
            f = self.schedule.finest.factor
            net_hw = hw
            if any(abs(f * s - round(f * s)) > 1e-9 for s in hw):
                if not hasattr(self.model, "padded_shape"):
                    raise InputDataError(f"frames of {hw[0]} x {hw[1]} px do not give whole cells on the finest "
                                         f"output scale {f}; crop the stack to a multiple of {1 / f:g} px.")
                net_hw = tuple(self.model.padded_shape(hw))
            ext = [self.schedule.xextent, self.schedule.yextent]
            width = [(e[1] - e[0]) / s for e, s in zip(ext, self.schedule.input_shape)]
            xext, yext = [(e[0], e[0] + w * s) for e, w, s in zip(ext, width, net_hw)]
            grid = ScaleSchedule(net_hw, [f], xextent=xext, yextent=yext).finest
            self._grids[hw] = (grid, net_hw)
        return self._grids[hw]

    def post_for(self, hw: Sequence[int]):
        """The backend's post-processing for frames of ``hw`` px (None when ``PostProcessing`` is empty)."""
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self._posts:
            self._posts[hw] = self.task.postprocessor(self.output_grid(hw)[0])
        return self._posts[hw]

    # ------------------------------------------------------------------ units
    def adu_to_photons(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw camera frames (ADU) -> photons, as DECODE does for ``Camera.convert2photons``."""
        return self.camera.backward(frames) if self.frames.convert2photons else frames

    def to_network(self, frames_photons: torch.Tensor) -> torch.Tensor:
        """Frames in photons (any shape) -> network input units (DECODE's AmplitudeRescale)."""
        return self.frame_scale(frames_photons.float())

    def check_frames(self, frames_NCHW: torch.Tensor, first_frame: int = 0) -> None:
        if frames_NCHW.dim() != 4 or frames_NCHW.size(1) != self.channels_in:
            raise ShapeError(f"frames must be (N, {self.channels_in}, H, W) (HyperParameter.channels_in = "
                             f"{self.channels_in}), got {tuple(frames_NCHW.shape)}.")
        bad = ~torch.isfinite(frames_NCHW).flatten(1).all(1)
        if bad.any():
            ix = (torch.nonzero(bad).flatten() + first_frame).tolist()[:10]
            raise InputDataError(f"frames {ix} contain NaN or Inf pixels. Remove or repair those frames "
                                 "(decode-var-fit --mask-nonfinite replaces them by the frame's median).")

    # ------------------------------------------------------------------ model
    @torch.no_grad()
    def maps(self, net_NCHW: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Network input (N, C, H, W) -> finest-scale map in physical units (N, C_out, sx, sy), on the CPU
        (the task's output: 6 channels, 10 for SigmaMUNet with its sigmas).

        Pads frames whose size the finest grid cannot divide (see :meth:`output_grid`).
        """
        hw = tuple(net_NCHW.shape[-2:])
        _, net_hw = self.output_grid(hw)
        if net_hw != hw:
            net_NCHW = torch.nn.functional.pad(net_NCHW, (0, net_hw[1] - hw[1], 0, net_hw[0] - hw[0]),
                                               mode="replicate")
        x = net_NCHW.float()
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._run_model(x).float().cpu().contiguous()
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out).flatten(1).all(1)).nonzero().flatten() + first_frame
            raise InputDataError(f"the model produced non-finite outputs for frames {bad.tolist()[:10]}. "
                                 "Check those frames (saturated or corrupt?) and that the param matches the model.")
        return self.task.to_physical(out)

    def output(self, frames_NCHW_photons: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Finest-scale map in physical units, (N, C_out, sx, sy), from frames in photons."""
        self.check_frames(frames_NCHW_photons, first_frame)
        return self.maps(self.to_network(frames_NCHW_photons), first_frame)

    def emitters(self, out_phys: torch.Tensor, first_frame: int = 0,
                 frame_hw: Optional[Sequence[int]] = None) -> EmitterSet:
        """Post-process physical maps of frames of ``frame_hw`` px (default: the map's grid / factor);
        localizations outside the frame or the trained z range are dropped (:meth:`localize` counts them)."""
        return self.localize(out_phys, first_frame, frame_hw)[0]

    def localize(self, out_phys: torch.Tensor, first_frame: int = 0,
                 frame_hw: Optional[Sequence[int]] = None) -> tuple[EmitterSet, dict]:
        """(emitters, dropped): post-processed physical maps (N, C_out, sx, sy) of frames of ``frame_hw`` px,
        frame_ix counted from ``first_frame``; ``dropped`` counts what was left out:
        ``{'outside_frame': n, 'outside_z': m}`` (see :meth:`inside`)."""
        if frame_hw is None:
            f = self.schedule.finest.factor
            frame_hw = tuple(int(round(s / f)) for s in out_phys.shape[-2:])
        post = self.post_for(frame_hw)
        if post is None:
            raise InputDataError("PostProcessing is empty in the param file: no emitters can be fitted. "
                                 "Set PostProcessing: SpatialIntegration (or LookUp).")
        em = post.forward(out_phys)
        in_frame, in_z = self.inside(em, frame_hw)
        dropped = {"outside_frame": int((~in_frame).sum()), "outside_z": int((in_frame & ~in_z).sum())}
        em = em[in_frame & in_z]
        if first_frame:
            em.frame_ix = em.frame_ix + first_frame
        return em, dropped

    def inside(self, em: EmitterSet, frame_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_frame (E,), in_z (E,)) bool: x, y within the frame's field of view, ``[x0, x0 + H * w)`` and
        ``[y0, y0 + W * w)`` px (x0, y0, w: the training pixel origin and width, ``Simulation.psf_extent``;
        by default ``[-0.5, H - 0.5)``), and z within the trained range ``Simulation.emitter_extent`` z
        (nm) widened by :data:`Z_MARGIN_SHARE` of its length on each side: an emitter near the edge of the
        range is localized with the model's axial error (about 130 nm RMSE for the quickstart model, whose
        test set put 25 of 2,261 true emitters' localizations up to 200 nm beyond +-750 nm), while a z far
        outside is no emitter the model learned to see (a saturated frame gave -4.5 to +7.2 um). NaN is
        outside."""
        ext = [self.schedule.xextent, self.schedule.yextent]
        width = [(e[1] - e[0]) / s for e, s in zip(ext, self.schedule.input_shape)]
        xyz = em.xyz_px
        in_frame = torch.ones(len(em), dtype=torch.bool, device=xyz.device)
        for axis, (e, w, n) in enumerate(zip(ext, width, frame_hw)):
            in_frame &= (xyz[:, axis] >= e[0]) & (xyz[:, axis] < e[0] + w * int(n))
        z_lo, z_hi = self.frames.z_range
        margin = Z_MARGIN_SHARE * (z_hi - z_lo)
        in_z = (xyz[:, 2] >= z_lo - margin) & (xyz[:, 2] <= z_hi + margin)
        return in_frame, in_z

    def predict(self, frames_NCHW_photons: torch.Tensor, first_frame: int = 0, batch_size: int = 64) -> EmitterSet:
        hw = tuple(frames_NCHW_photons.shape[-2:])
        ems = []
        for i in range(0, frames_NCHW_photons.size(0), batch_size):
            out = self.output(frames_NCHW_photons[i:i + batch_size], first_frame + i)
            ems.append(self.emitters(out, first_frame + i, hw))
        return EmitterSet.cat(ems) if ems else EmitterSet.empty(px_size=self.frames.px_size)

    # ------------------------------------------------------------------ memory
    def window_bytes(self, hw: Sequence[int]) -> int:
        """Estimated peak memory, in bytes, of one frame window of ``hw`` px through :meth:`predict`.

        The model part is measured once: the bytes of every module output of one 64 x 64 px window,
        scaled by area. Inference frees activations as it goes, so far less is alive at once:
        :data:`LIVE_SHARE` of that sum, calibrated on the resident memory of real fits (see its
        note). Frames (raw, photons, network input) and the 6-channel maps (raw, physical,
        post-processing) are added from their shapes.
        """
        grid, net_hw = self.output_grid(hw)
        if self._act_bytes_per_px is None:
            self._act_bytes_per_px = self._measure_activation_bytes()
        model = LIVE_SHARE * self._act_bytes_per_px * net_hw[0] * net_hw[1]
        frames = 4 * 3 * self.channels_in * net_hw[0] * net_hw[1]
        maps = 4 * 4 * 6 * grid.img_shape[0] * grid.img_shape[1]
        return int(model + frames + maps)

    @torch.no_grad()
    def _measure_activation_bytes(self) -> float:
        probe = tuple(self.model.padded_shape((64, 64))) if hasattr(self.model, "padded_shape") else (64, 64)
        total = [0]

        def count(_module, _inp, out):
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    total[0] += t.numel() * t.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            self.model(torch.zeros(1, self.channels_in, *probe, device=self.device))
        finally:
            for h in hooks:
                h.remove()
        return total[0] / (probe[0] * probe[1])

    def auto_batch_size(self, hw: Sequence[int], max_bytes: int, n_frames: Optional[int] = None,
                        cap: int = 256) -> int:
        """Windows per batch that keep :meth:`window_bytes` x batch within ``max_bytes``.

        Raises:
            InputDataError: when even one window does not fit, naming the memory it needs.
        """
        need = self.window_bytes(hw)
        if need > max_bytes:
            raise InputDataError(
                f"one {int(hw[0])} x {int(hw[1])} px frame window needs about {need / 2**20:.0f} MiB, more than the "
                f"memory budget of {max_bytes / 2**20:.0f} MiB. Raise --max-memory to at least "
                f"{math.ceil(1.25 * need / 2**20)}MB, or crop the stack into smaller fields of view.")
        n = max(1, min(cap, int(max_bytes // need)))
        return min(n, n_frames) if n_frames else n


def default_max_memory(device) -> int:
    """Memory budget of a fit when ``--max-memory`` is not given, in bytes: 1 GiB on the CPU (so a
    fit stays under about 2 GB with the model and the process), half the free memory of a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return 2 ** 30


def parse_memory(text: str) -> int:
    """'1.5G', '800MB', '2GiB', '512M' -> bytes (a bare number is MiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputDataError(f"--max-memory {text!r} is not a memory size; write e.g. 2G, 800MB or 1.5GB.")
    unit = {"": 2 ** 20, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def add_model_arguments(parser, frames_help: Optional[str]) -> None:
    """The arguments decode-var-eval and decode-var-fit share: param, model, frames, device, trust, memory."""
    parser.add_argument("-p", "--param_file", required=True, help="the experiment's param_run.yaml")
    parser.add_argument("--model", required=True, help="model.pt (or the experiment folder)")
    parser.add_argument("--frames", required=frames_help is None, default=None,
                        help=frames_help or "TIFF stack, or a folder of TIFF files read in name order (frames in ADU when "
                             "Camera.convert2photons)")
    parser.add_argument("-i", "--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling of --model")
    parser.add_argument("--batch-size", default="auto",
                        help="frame windows per batch; 'auto' (default) picks the largest that fits --max-memory")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile: about 2x faster on long stacks after a "
                             "compile of a minute or two (needs a C++ compiler on the CPU)")
    parser.add_argument("--sparse", action="store_true",
                        help="compute the finer scales only around the coarse cells that see an emitter (the same "
                             "localizations; faster on one thread at low density, slower on two: docs/fitting.md)")
    parser.add_argument("--max-memory", default=None,
                        help="memory budget of a batch, e.g. 2G or 800MB (default 1G on the CPU, half the free "
                             "memory of a GPU); peak memory stays bounded whatever the stack length")


def resolve_model_path(path) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p
