"""Matching of predicted to ground-truth emitters and the metrics of DECODE 0.10.

- :class:`GreedyHungarianMatching`: per frame, all pairs within the distance limits are taken in order of
  increasing distance, each emitter used at most once (DECODE's greedy "hungarian" matching). Distances
  are computed on ``xyz_nm`` (x, y, z in nm), so px-unit sets need ``px_size``.
- :class:`SegmentationEvaluation`: precision, recall, Jaccard index, F1.
- :class:`DistanceEvaluation`: RMSE and mean absolute distance, lateral / axial / volumetric, in nm.
- :func:`efficiency`: Sage et al. 2019, with DECODE's alpha_lat = 1, alpha_ax = 0.5 (per nm).
- :func:`evaluate`: all of the above as one dict with DECODE's key names, plus photon and bg errors.

Empty cases follow DECODE: a ratio with a zero denominator is nan (not 0), F1 is nan when precision +
recall is 0 or nan, and every distance metric is nan without true positives.
"""
from __future__ import annotations

import math
import warnings
from collections import namedtuple
from typing import Optional, Tuple

import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError

__all__ = ["GreedyHungarianMatching", "MatchResult", "SegmentationEvaluation", "DistanceEvaluation",
           "precision_recall_jaccard", "rmse_mad_dist", "efficiency", "evaluate", "ALPHA_LAT", "ALPHA_AX"]

ALPHA_LAT = 1.0  # 1 / nm, DECODE's SMLMEvaluation.alpha_lat
ALPHA_AX = 0.5  # 1 / nm, DECODE's SMLMEvaluation.alpha_ax

MatchResult = namedtuple("MatchResult", ["tp", "fp", "fn", "tp_match"])


class GreedyHungarianMatching:
    """Greedy nearest-first matching of output to target emitters, frame by frame.

    Args:
        match_dims: 2 (distance on x, y) or 3 (x, y, z) for ranking candidate pairs.
        dist_lat: lateral limit in nm (pairs farther apart in x-y are never matched); None = no limit.
        dist_ax: axial limit in nm; None = no limit.
        dist_vol: 3D limit in nm; None = no limit.

    A pair exactly at a limit is still allowed (DECODE rules out ``dist > limit``). Ties in distance are
    broken by the position in the frame's emitter list (output first, then target), as DECODE's argmin does;
    that list is ordered by ``torch.sort(frame_ix)`` like DECODE's ``split_in_frames``.
    """

    def __init__(self, *, match_dims: int = 3, dist_lat: Optional[float] = 250.0, dist_ax: Optional[float] = 500.0,
                 dist_vol: Optional[float] = None):
        if match_dims not in (2, 3):
            raise ParamError(f"Evaluation.match_dims = {match_dims!r} must be 2 or 3.")
        for name, value in (("dist_lat", dist_lat), ("dist_ax", dist_ax), ("dist_vol", dist_vol)):
            if value is not None and not float(value) >= 0:
                raise ParamError(f"Evaluation.{name} = {value!r} must be a distance >= 0 in nm, or empty.")
        if dist_lat is None and dist_ax is None and dist_vol is None:
            warnings.warn("Matching without any distance limit: every output can match any target on its frame.")
        self.match_dims = match_dims
        self.dist_lat, self.dist_ax, self.dist_vol = dist_lat, dist_ax, dist_vol

    @classmethod
    def parse(cls, param):
        ev = param.Evaluation
        return cls(match_dims=ev.match_dims, dist_lat=ev.dist_lat, dist_ax=ev.dist_ax, dist_vol=ev.dist_vol)

    def filter(self, xyz_out: torch.Tensor, xyz_tar: torch.Tensor) -> torch.Tensor:
        """(N, M) bool: which output/target pairs lie within all limits. Coordinates in nm."""
        ok = torch.ones(xyz_out.size(0), xyz_tar.size(0), dtype=torch.bool)
        # cdist is called on batched (1, N, D) tensors like DECODE so that distances agree to the last bit.
        for limit, cols in ((self.dist_lat, [0, 1]), (self.dist_ax, [2]), (self.dist_vol, [0, 1, 2])):
            if limit is not None:
                ok &= ~(_cdist(xyz_out[:, cols], xyz_tar[:, cols]) > limit)
        return ok

    @staticmethod
    def _greedy(dist: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices (out_ix, tar_ix) of the greedy assignment on a distance matrix with inf = not allowed.

        Taking the smallest remaining distance again and again equals walking all allowed pairs sorted by
        distance (stable, so ties keep row-major order) and keeping a pair when both ends are still free.
        """
        flat = dist.reshape(-1)
        allowed = torch.isfinite(flat).nonzero(as_tuple=True)[0]
        order = allowed[torch.sort(flat[allowed], stable=True).indices].tolist()
        n_tar = dist.size(1)
        used_out, used_tar, out_ix, tar_ix = set(), set(), [], []
        for k in order:
            i, j = divmod(k, n_tar)
            if i in used_out or j in used_tar:
                continue
            used_out.add(i)
            used_tar.add(j)
            out_ix.append(i)
            tar_ix.append(j)
        return torch.tensor(out_ix, dtype=torch.long), torch.tensor(tar_ix, dtype=torch.long)

    def match_frame(self, xyz_out_nm: torch.Tensor, xyz_tar_nm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Greedy assignment on one frame: (out_ix, tar_ix) in the order the pairs were taken."""
        if xyz_out_nm.size(0) == 0 or xyz_tar_nm.size(0) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        dims = [0, 1] if self.match_dims == 2 else [0, 1, 2]
        dist = _cdist(xyz_out_nm[:, dims], xyz_tar_nm[:, dims])
        dist[~self.filter(xyz_out_nm, xyz_tar_nm)] = float("inf")
        return self._greedy(dist)

    def forward(self, output: EmitterSet, target: EmitterSet) -> MatchResult:
        """Match ``output`` to ``target``; returns (tp, fp, fn, tp_match) as EmitterSets.

        ``tp[i]`` is matched to ``tp_match[i]``; ``tp`` gets the ids of its ground truth (as DECODE does).
        Sets on a GPU (a test set simulated with ``Hardware.device_simulation: cuda``) are matched on the CPU.
        """
        output = output if output.device.type == "cpu" else output.to("cpu")
        target = target if target.device.type == "cpu" else target.to("cpu")
        if len(output) == 0 and len(target) == 0:
            empty = EmitterSet.empty(xy_unit=target.xy_unit, px_size=target.px_size)
            return MatchResult(empty, empty.clone(), empty.clone(), empty.clone())
        frames = torch.cat([output.frame_ix, target.frame_ix])
        lo, hi = int(frames.min()), int(frames.max())
        out_nm, tar_nm = output.xyz_nm, target.xyz_nm

        tp, fp, fn, tp_match = [], [], [], []
        # Within a frame, emitters are taken in the order of torch.sort(frame_ix) (not stable), because that
        # is how DECODE splits sets into frames; the order decides ties and the order of the results.
        out_groups = _group_by_frame(output.frame_ix)
        tar_groups = _group_by_frame(target.frame_ix)
        for f in sorted(set(out_groups) | set(tar_groups)):
            if not lo <= f <= hi:
                continue
            o_ix = out_groups.get(f, torch.zeros(0, dtype=torch.long))
            t_ix = tar_groups.get(f, torch.zeros(0, dtype=torch.long))
            oi, ti = self.match_frame(out_nm[o_ix], tar_nm[t_ix])
            o_used = torch.zeros(len(o_ix), dtype=torch.bool)
            t_used = torch.zeros(len(t_ix), dtype=torch.bool)
            o_used[oi] = True
            t_used[ti] = True
            tp.append(o_ix[oi])
            tp_match.append(t_ix[ti])
            fp.append(o_ix[~o_used])
            fn.append(t_ix[~t_used])

        def take(em, parts):
            ix = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            return em[ix]

        tp, fp = take(output, tp), take(output, fp)
        fn, tp_match = take(target, fn), take(target, tp_match)
        if len(tp_match) and bool((tp_match.id == -1).all()):
            tp_match.id = torch.arange(len(tp_match))
        tp.id = tp_match.id.clone()
        return MatchResult(tp, fp, fn, tp_match)

    __call__ = forward


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.unsqueeze(0), b.unsqueeze(0), p=2).squeeze(0)


def _group_by_frame(frame_ix: torch.Tensor) -> dict:
    if frame_ix.numel() == 0:
        return {}
    order = torch.sort(frame_ix).indices
    frames, counts = torch.unique_consecutive(frame_ix[order], return_counts=True)
    return {int(f): ix for f, ix in zip(frames.tolist(), torch.split(order, counts.tolist()))}


# metrics ------------------------------------------------------------------------------------------
def precision_recall_jaccard(tp: int, fp: int, fn: int) -> Tuple[float, float, float, float]:
    """(precision, recall, jaccard, f1) from counts; nan where the denominator is 0."""
    tp, fp, fn = float(tp), float(fp), float(fn)
    prec = tp / (tp + fp) if tp + fp else math.nan
    rec = tp / (tp + fn) if tp + fn else math.nan
    jac = tp / (tp + fp + fn) if tp + fp + fn else math.nan
    # nan + x is nan, never 0, so the division below yields nan as in DECODE
    f1 = math.nan if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return prec, rec, jac, f1


def rmse_mad_dist(xyz_0: torch.Tensor, xyz_1: torch.Tensor) -> Tuple[float, ...]:
    """(rmse_lat, rmse_ax, rmse_vol, mad_lat, mad_ax, mad_vol) between paired (E, 3) coordinates.

    Lateral RMSE is sqrt(mean(dx^2 + dy^2)); lateral MAD is mean(|dx| + |dy|) (DECODE's definitions).
    All nan for E = 0.
    """
    if xyz_0.shape != xyz_1.shape:
        raise ValueError(f"Paired coordinates differ in shape: {tuple(xyz_0.shape)} vs {tuple(xyz_1.shape)}.")
    n = xyz_0.size(0)
    if n == 0:
        return (math.nan,) * 6
    d = xyz_0 - xyz_1
    sq, ab = d ** 2, d.abs()
    rmse_lat = ((sq[:, 0].sum() + sq[:, 1].sum()) / n).sqrt()
    rmse_ax = (sq[:, 2].sum() / n).sqrt()
    rmse_vol = (sq.sum() / n).sqrt()
    mad_lat = (ab[:, 0].sum() + ab[:, 1].sum()) / n
    mad_ax = ab[:, 2].sum() / n
    mad_vol = ab.sum() / n
    return tuple(float(v) for v in (rmse_lat, rmse_ax, rmse_vol, mad_lat, mad_ax, mad_vol))


def efficiency(jac: float, rmse: float, alpha: float) -> float:
    """Sage et al. 2019 efficiency in [.., 1]: 1 - sqrt((100 (1 - jac))^2 + alpha^2 rmse^2) / 100; rmse in nm."""
    return (100 - ((100 * (1 - jac)) ** 2 + alpha ** 2 * rmse ** 2) ** 0.5) / 100


class SegmentationEvaluation:
    """Precision, recall, Jaccard, F1 of a matching."""

    _return = namedtuple("seg_eval", ["prec", "rec", "jac", "f1"])

    def forward(self, tp: EmitterSet, fp: EmitterSet, fn: EmitterSet):
        return self._return(*precision_recall_jaccard(len(tp), len(fp), len(fn)))

    __call__ = forward


class DistanceEvaluation:
    """RMSE / MAD between true positives and their ground truth, in nm."""

    _return = namedtuple("dist_eval", ["rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "mad_ax", "mad_vol"])

    def forward(self, tp: EmitterSet, tp_match: EmitterSet):
        if len(tp) == 0 and len(tp_match) == 0:
            return self._return(*(math.nan,) * 6)
        return self._return(*rmse_mad_dist(tp.xyz_nm, tp_match.xyz_nm))

    __call__ = forward


def _rmse_mad(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Tuple[float, float]:
    """RMSE and MAD over the entries where both are finite; nan when there are none."""
    if a is None or b is None:
        return math.nan, math.nan
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not bool(ok.any()):
        return math.nan, math.nan
    d = (a[ok] - b[ok]).double()
    return float((d ** 2).mean().sqrt()), float(d.abs().mean())


def evaluate(tp: EmitterSet, fp: EmitterSet, fn: EmitterSet, tp_match: EmitterSet,
             alpha_lat: float = ALPHA_LAT, alpha_ax: float = ALPHA_AX) -> dict:
    """All metrics of a matching as a flat dict of floats.

    Keys: prec, rec, jac, f1, rmse_lat, rmse_ax, rmse_vol, mad_lat, mad_ax, mad_vol (nm), effcy_lat,
    effcy_ax, effcy_vol (= mean of lat and ax, as DECODE), rmse_phot, mad_phot (photons), rmse_bg
    (photons / px, over pairs where both sets have a finite bg), n_tp, n_fp, n_fn.
    """
    seg = SegmentationEvaluation().forward(tp, fp, fn)
    dist = DistanceEvaluation().forward(tp, tp_match)
    out = dict(seg._asdict())
    out.update(dist._asdict())
    out["effcy_lat"] = efficiency(seg.jac, dist.rmse_lat, alpha_lat)
    out["effcy_ax"] = efficiency(seg.jac, dist.rmse_ax, alpha_ax)
    out["effcy_vol"] = (out["effcy_lat"] + out["effcy_ax"]) / 2
    out["rmse_phot"], out["mad_phot"] = _rmse_mad(tp.phot, tp_match.phot)
    out["rmse_bg"] = _rmse_mad(tp.bg, tp_match.bg)[0]
    out["n_tp"], out["n_fp"], out["n_fn"] = len(tp), len(fp), len(fn)
    return out
