"""The evaluation protocol: one seeded test set and one scoring, for the trainer's per-epoch evaluation,
``decode-var-eval`` and the benchmarks.

- **The test set**: ``TestSet.test_size`` samples simulated with the seed derived from ``VAR.test_seed``
  (:func:`test_set_seed`), the same set for every epoch, every evaluation and every model trained on the
  same simulation. Its ground truth (:func:`ground_truth`) is the emitters of each sample's centre frame
  with at least ``HyperParameter.emitter_label_photon_min`` photons (DECODE's label threshold), each with
  the true background at its pixel (photons / px) for the CRLB.
- **The score** (:func:`score`): the backend's matching (DECODE's ``GreedyHungarianMatching``) and
  metrics (precision, recall, Jaccard, RMSE, efficiency), the counts, and the localization error against
  the CRLB of the run's PSF (:func:`decode_var.evaluation.crlb_scoring.crlb_metrics`).

Nothing here draws a random number from a global stream: the test set comes from its own seed.
"""
from __future__ import annotations

from typing import Optional

import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.seeds import derive_seed
from decode_var.evaluation.crlb_scoring import background_at, crlb_metrics

__all__ = ["test_set_seed", "test_set_size", "simulate_test_set", "ground_truth", "score"]


def test_set_seed(param) -> int:
    """The test set's simulation seed (from ``VAR.test_seed``)."""
    return derive_seed(param.VAR.test_seed, 0)


def test_set_size(param, n: Optional[int] = None) -> int:
    """Samples of the test set: ``n`` where given, else ``TestSet.test_size``."""
    return int(n or param.TestSet.test_size)


def simulate_test_set(simulator, param, n: Optional[int] = None):
    """The seeded test set as a simulated ``Batch`` (frames in photons, emitters, true background)."""
    return simulator.sample(test_set_size(param, n), test_set_seed(param))


def ground_truth(param, batch) -> EmitterSet:
    """The emitters the metrics count: the centre frames' emitters with at least
    ``HyperParameter.emitter_label_photon_min`` photons, with ``bg`` (photons / px) at each one's pixel."""
    em = batch.em
    photon_min = param.HyperParameter.emitter_label_photon_min
    keep = em.phot >= photon_min if photon_min is not None else torch.ones(len(em), dtype=torch.bool)
    gt = em[keep]  # a copy: the batch (the trainer keeps its test set) is left as it is
    gt.bg = background_at(batch.bg_NHW.cpu(), gt) if len(gt) else torch.zeros(0)
    return gt


def score(param, backend, matcher, em_out: EmitterSet, gt: EmitterSet) -> tuple[dict, tuple]:
    """(metrics, (tp, fp, fn, tp_match)): DECODE's metrics of ``em_out`` against ``gt``, ``n_pred``,
    ``n_gt``, ``n_tp`` and the CRLB ratios (where ``gt`` has its background). Metrics are floats (None ->
    NaN), DECODE's key names."""
    tp, fp, fn, tp_match = matcher.forward(em_out, gt)
    metrics = dict(backend.evaluate(tp, fp, fn, tp_match))
    metrics["n_pred"], metrics["n_gt"], metrics["n_tp"] = len(em_out), len(gt), len(tp)
    metrics.update(crlb_metrics(param, tp, tp_match))
    return {k: (float(v) if v is not None else float("nan")) for k, v in metrics.items()}, (tp, fp, fn, tp_match)
