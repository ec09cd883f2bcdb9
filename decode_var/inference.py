"""Run a trained model on frames: camera frames -> network input -> finest map -> emitters.

Shared by ``decode-var-eval`` and ``decode-var-fit``. The chain follows DECODE's ``Infer`` and
post-processing: frames in photons are scaled like in training (``(x - input_offset) /
input_scale``), the model's eval output (finest scale, p after the sigmoid) is rescaled to
photons / px offsets / nm / photons per px and post-processed on the finest grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .backend import get_backend
from .checkpoint import load_model_weights
from .emitters import EmitterSet
from .errors import InputDataError, ShapeError
from .scales import ScaleSchedule
from .simulation import Camera, FrameScale
from .targets import TargetRescale


class Predictor:
    """A trained model with the processing around it.

    Args:
        param: the experiment's param (``param_run.yaml``).
        model_path: ``model.pt`` (or ``ckpt.pt``).
        device: torch device string.
        trusted: allow arbitrary unpickling of the model file (only for files you trust).
    """

    def __init__(self, param, model_path, device: str = "cpu", trusted: bool = False):
        from .registry import build_model

        self.param = param
        self.device = torch.device(device)
        self.backend = get_backend(param.VAR.backend)
        self.model = build_model(param)
        load_model_weights(self.model, model_path, trusted=trusted)
        self.model.to(self.device).eval()
        self.schedule = ScaleSchedule.parse(param)
        self.frame_scale = FrameScale.parse(param)
        self.rescale = TargetRescale.parse(param)
        self.camera = Camera.parse(param)
        self.post = self.backend.post_processing(param, self.schedule.finest)
        self.channels_in = int(param.HyperParameter.channels_in)

    def adu_to_photons(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw camera frames (ADU) -> photons, as DECODE does for ``Camera.convert2photons``."""
        return self.camera.backward(frames) if self.param.Camera.convert2photons else frames

    def check_frames(self, frames_NCHW: torch.Tensor, first_frame: int = 0) -> None:
        if frames_NCHW.dim() != 4 or frames_NCHW.size(1) != self.channels_in:
            raise ShapeError(f"frames must be (N, {self.channels_in}, H, W) (HyperParameter.channels_in = "
                             f"{self.channels_in}), got {tuple(frames_NCHW.shape)}.")
        bad = ~torch.isfinite(frames_NCHW).flatten(1).all(1)
        if bad.any():
            ix = (torch.nonzero(bad).flatten() + first_frame).tolist()[:10]
            raise InputDataError(f"frames {ix} contain NaN or Inf pixels. Remove or repair those frames "
                                 "(decode-var-fit --mask-nonfinite replaces them by the frame's median).")

    @torch.no_grad()
    def output(self, frames_NCHW_photons: torch.Tensor, first_frame: int = 0) -> torch.Tensor:
        """Finest-scale map in physical units, (N, 6, sx, sy)."""
        self.check_frames(frames_NCHW_photons, first_frame)
        x = self.frame_scale(frames_NCHW_photons.float()).to(self.device)
        out = self.model(x).float().cpu()
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out).flatten(1).all(1)).nonzero().flatten() + first_frame
            raise InputDataError(f"the model produced non-finite outputs for frames {bad.tolist()[:10]}. "
                                 "Check those frames (saturated or corrupt?) and that the param matches the model.")
        return self.rescale.inverse(out, self.schedule.finest.cell_size)

    def emitters(self, out_phys: torch.Tensor, first_frame: int = 0) -> EmitterSet:
        if self.post is None:
            raise InputDataError("PostProcessing is empty in the param file: no emitters can be fitted. "
                                 "Set PostProcessing: SpatialIntegration (or LookUp).")
        em = self.post.forward(out_phys)
        if first_frame:
            em.frame_ix = em.frame_ix + first_frame
        return em

    def predict(self, frames_NCHW_photons: torch.Tensor, first_frame: int = 0, batch_size: int = 64) -> EmitterSet:
        ems = []
        for i in range(0, frames_NCHW_photons.size(0), batch_size):
            out = self.output(frames_NCHW_photons[i:i + batch_size], first_frame + i)
            ems.append(self.emitters(out, first_frame + i))
        return EmitterSet.cat(ems) if ems else EmitterSet.empty(px_size=self.param.Camera.px_size)


def add_model_arguments(parser, frames_help: Optional[str]) -> None:
    """The arguments decode-var-eval and decode-var-fit share: param, model, frames, device, trust."""
    parser.add_argument("-p", "--param_file", required=True, help="the experiment's param_run.yaml")
    parser.add_argument("--model", required=True, help="model.pt (or the experiment folder)")
    parser.add_argument("--frames", required=frames_help is None, default=None,
                        help=frames_help or "TIFF stack (frames in ADU when Camera.convert2photons)")
    parser.add_argument("-i", "--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--trust-pickle", action="store_true", help="allow arbitrary unpickling of --model")


def resolve_model_path(path) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p
