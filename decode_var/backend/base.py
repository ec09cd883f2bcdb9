"""The backend interface: what training, evaluation and fitting ask of a backend.

Two implementations: :class:`decode_var.backend.builtin.BuiltinBackend` (decode-var's own code
with DECODE's conventions) and :class:`decode_var.backend.decode.DecodeBackend` (DECODE 0.10's own
classes). Every method takes and returns built-in types at the seam
(:class:`decode_var.core.emitters.EmitterSet`, tensors), so callers never see which one they have.
Units: emitter x, y in px of the input frame (x = first image axis), z in nm, photons, bg in
photons / px.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from decode_var.core.scales import Scale


class Backend(ABC):
    """One backend: simulation, targets and weights, post-processing, matching, metrics, emitter files."""

    name: str = ""

    # emitters ---------------------------------------------------------------------------------
    @abstractmethod
    def to_native(self, em):
        """A built-in EmitterSet as the backend's own emitter type (what its generators take)."""

    @abstractmethod
    def to_builtin(self, em):
        """The backend's emitter type as a built-in EmitterSet."""

    # targets and weights ----------------------------------------------------------------------
    @abstractmethod
    def target_generator(self, scale: Scale, roi_size: int):
        """UnifiedEmbeddingTarget on ``scale``'s grid: ``forward(em, bg_NHW, ix_low, ix_high) -> (N, 6, H, W)``."""

    @abstractmethod
    def weight_generator(self, scale: Scale, roi_size: int):
        """SimpleWeight 'const' on ``scale``'s grid: ``forward(em, target_N6HW, ix_low, ix_high) -> (N, 6, H, W)``."""

    # simulation -------------------------------------------------------------------------------
    @abstractmethod
    def simulator(self, param):
        """An object with ``sample(n, seed) -> Batch`` and ``sample_seeded(seeds) -> Batch``."""

    # post-processing, matching, evaluation, emitter files -------------------------------------
    @abstractmethod
    def post_processing(self, settings, scale: Scale):
        """Physical-unit (N, 6, H, W) output on ``scale`` -> EmitterSet (``forward``), or None; ``settings``: the
        run's :class:`~decode_var.evaluation.postprocessing.PostSettings`."""

    @abstractmethod
    def matcher(self, param):
        """``forward(output_em, target_em) -> (tp, fp, fn, tp_match)`` (GreedyHungarianMatching)."""

    @abstractmethod
    def evaluate(self, tp, fp, fn, tp_match) -> dict:
        """DECODE's metrics (precision, recall, Jaccard, RMSE, efficiency, ...) of a matching."""

    @abstractmethod
    def save_emitters(self, path, em) -> None:
        """Write an EmitterSet (.h5 / .pt / .csv, by suffix)."""

    @abstractmethod
    def load_emitters(self, path):
        """Read an EmitterSet written by :meth:`save_emitters` (or by DECODE)."""

    # DECODE's own parameter-list models ---------------------------------------------------------
    @abstractmethod
    def gmm_chain(self, param):
        """DECODE's data and output chain of SigmaMUNet + GaussianMMLoss (see
        :class:`decode_var.training.tasks.GMMTask`): an object with ``targets(batch, n)``,
        ``inverse(output)`` and ``postprocess(output_phys) -> EmitterSet``."""
