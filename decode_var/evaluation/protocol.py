"""The evaluation protocol: one seeded test set and one scoring, for the trainer's per-epoch evaluation,
``decode-var-eval`` and the benchmarks.

- **The test set**: ``TestSet.test_size`` samples simulated with the seed derived from ``VAR.test_seed``
  (:attr:`Protocol.seed`), the same set for every epoch, every evaluation and every model trained on the
  same simulation. Its ground truth (:meth:`Protocol.ground_truth`) is the emitters of each sample's centre frame
  with at least ``HyperParameter.emitter_label_photon_min`` photons (DECODE's label threshold), each with
  the true background at its pixel (photons / px) for the CRLB.
- **The score** (:meth:`Protocol.score`): the backend's matching (DECODE's ``GreedyHungarianMatching``) and
  metrics (precision, recall, Jaccard, RMSE, efficiency), the counts, and the localization error against
  the CRLB of the run's PSF (:meth:`decode_var.evaluation.crlb_scoring.CrlbModel.metrics`).

Nothing here draws a random number from a global stream: the test set comes from its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.seeds import derive_seed
from decode_var.evaluation.crlb_scoring import CrlbModel, background_at

__all__ = ["Protocol"]


@dataclass(frozen=True)
class Protocol:
    """The evaluation protocol of a run, parsed once from the param (:meth:`parse`).

    Attributes:
        test_size: samples of the test set (``TestSet.test_size``).
        seed: its simulation seed (derived from ``VAR.test_seed``, :attr:`root_seed`; other held-out sets derive
            theirs from it too).
        photon_min: photons an emitter needs to count (``HyperParameter.emitter_label_photon_min``; None: all).
        crlb: the run's PSF and camera for the CRLB ratios.
    """

    test_size: int
    seed: int
    photon_min: Optional[float]
    crlb: CrlbModel
    root_seed: int

    @classmethod
    def parse(cls, param) -> "Protocol":
        return cls(int(param.TestSet.test_size), derive_seed(param.VAR.test_seed, 0),
                   param.HyperParameter.emitter_label_photon_min, CrlbModel.parse(param), param.VAR.test_seed)

    def size(self, n: Optional[int] = None) -> int:
        """Samples of the test set: ``n`` where given, else :attr:`test_size`."""
        return int(n or self.test_size)

    def simulate(self, simulator, n: Optional[int] = None):
        """The seeded test set as a simulated ``Batch`` (frames in photons, emitters, true background)."""
        return simulator.sample(self.size(n), self.seed)

    def ground_truth(self, batch) -> EmitterSet:
        """The emitters the metrics count: the centre frames' emitters with at least :attr:`photon_min`
        photons, with ``bg`` (photons / px) at each one's pixel."""
        em = batch.em
        keep = em.phot >= self.photon_min if self.photon_min is not None else torch.ones(len(em), dtype=torch.bool)
        gt = em[keep]  # a copy: the batch (the trainer keeps its test set) is left as it is
        gt.bg = background_at(batch.bg_NHW.cpu(), gt) if len(gt) else torch.zeros(0)
        return gt

    def score(self, backend, matcher, em_out: EmitterSet, gt: EmitterSet) -> tuple[dict, tuple]:
        """(metrics, (tp, fp, fn, tp_match)): DECODE's metrics of ``em_out`` against ``gt``, ``n_pred``,
        ``n_gt``, ``n_tp`` and the CRLB ratios (where ``gt`` has its background). Metrics are floats (None ->
        NaN), DECODE's key names."""
        tp, fp, fn, tp_match = matcher.forward(em_out, gt)
        metrics = dict(backend.evaluate(tp, fp, fn, tp_match))
        metrics["n_pred"], metrics["n_gt"], metrics["n_tp"] = len(em_out), len(gt), len(tp)
        metrics.update(self.crlb.metrics(tp, tp_match))
        return {k: (float(v) if v is not None else float("nan")) for k, v in metrics.items()}, (tp, fp, fn, tp_match)
