"""The built-in backend: decode-var's own simulation, targets, post-processing, matching and metrics,
following DECODE 0.10's conventions, for machines without DECODE."""
from __future__ import annotations

from decode_var.backend.base import Backend
from decode_var.core.errors import BackendError
from decode_var.core.scales import Scale
from decode_var.data.emitter_io import load_emitters, save_emitters
from decode_var.data.simulation import Simulator
from decode_var.data.targets import SimpleWeight, UnifiedEmbeddingTarget
from decode_var.evaluation import postprocessing
from decode_var.evaluation.matching import GreedyHungarianMatching, evaluate


class BuiltinBackend(Backend):
    """decode-var's own classes with DECODE's conventions (no DECODE needed)."""

    name = "builtin"

    # emitters ---------------------------------------------------------------------------------
    def to_native(self, em):
        return em

    def to_builtin(self, em):
        return em

    # targets and weights ----------------------------------------------------------------------
    def target_generator(self, scale: Scale, roi_size: int):
        return UnifiedEmbeddingTarget(scale.xextent, scale.yextent, scale.img_shape, roi_size)

    def weight_generator(self, scale: Scale, roi_size: int):
        return SimpleWeight(scale.xextent, scale.yextent, scale.img_shape, roi_size)

    # simulation -------------------------------------------------------------------------------
    def simulator(self, param):
        """A :class:`decode_var.data.simulation.Simulator` (``sample(n, seed) -> Batch``)."""
        return Simulator.parse(param)

    # post-processing, matching, evaluation, emitter files -------------------------------------
    def post_processing(self, settings, scale: Scale):
        """Physical-unit (N, 6, sx, sy) output on ``scale`` -> EmitterSet (``forward``), or None."""
        return postprocessing.build(settings, scale)

    def matcher(self, param):
        return GreedyHungarianMatching.parse(param)

    def evaluate(self, tp, fp, fn, tp_match) -> dict:
        return evaluate(tp, fp, fn, tp_match)

    def save_emitters(self, path, em) -> None:
        save_emitters(path, em)

    def load_emitters(self, path):
        return load_emitters(path)

    def gmm_chain(self, param):
        raise BackendError(f"HyperParameter.loss_impl {param.HyperParameter.loss_impl!r} (DECODE's parameter-list "
                           "models) needs DECODE's own target and output chain: install DECODE 0.10 and set "
                           "VAR.backend: decode (or auto), or use a six-channel loss (AdaptivePPXYZB, PPXYZB).")
