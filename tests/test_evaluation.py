import math
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.backend import decode_available
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ParamError
from decode_var.evaluation.matching import (DistanceEvaluation, GreedyHungarianMatching, SegmentationEvaluation, efficiency,
                                   evaluate, precision_recall_jaccard)

PX = (100.0, 100.0)


def _em(xyz, frame_ix=None, phot=None, bg=None, unit="px", id=None):
    xyz = torch.tensor(xyz, dtype=torch.float32).reshape(-1, 3)
    n = len(xyz)
    return EmitterSet(xyz, torch.tensor(phot if phot is not None else [1000.0] * n),
                      torch.tensor(frame_ix if frame_ix is not None else [0] * n), id=id,
                      bg=None if bg is None else torch.tensor(bg), xy_unit=unit, px_size=PX)


GT = [[1.0, 1.0, 0.0], [5.0, 5.0, 100.0], [9.0, 2.0, -200.0], [3.0, 8.0, 50.0]]


def _run(out, tar, **kw):
    m = GreedyHungarianMatching(**{"match_dims": 3, "dist_lat": 250.0, "dist_ax": 500.0, **kw})
    return evaluate(*m.forward(out, tar))


def test_perfect():
    r = _run(_em(GT, phot=[1000.0, 2000, 3000, 4000], bg=[5.0] * 4), _em(GT, phot=[1000.0, 2000, 3000, 4000],
                                                                           bg=[5.0] * 4))
    assert (r["prec"], r["rec"], r["jac"], r["f1"]) == (1.0, 1.0, 1.0, 1.0)
    for k in ("rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "mad_ax", "mad_vol", "rmse_phot", "mad_phot", "rmse_bg"):
        assert r[k] == 0.0, k
    assert r["effcy_lat"] == r["effcy_ax"] == r["effcy_vol"] == 1.0


def test_known_offset():
    shifted = [[x + 0.3, y, z + 40.0] for x, y, z in GT]  # 30 nm lateral, 40 nm axial
    r = _run(_em(shifted, phot=[1100.0] * 4, bg=[6.0] * 4), _em(GT, phot=[1000.0] * 4, bg=[4.0] * 4))
    expect = dict(rmse_lat=30.0, rmse_ax=40.0, rmse_vol=50.0, mad_lat=30.0, mad_ax=40.0, mad_vol=70.0,
                  rmse_phot=100.0, mad_phot=100.0, rmse_bg=2.0)
    for k, v in expect.items():
        assert r[k] == pytest.approx(v, rel=1e-5), k
    assert r["effcy_lat"] == pytest.approx(0.7, rel=1e-5)  # 1 - 1.0 * 30 / 100
    assert r["effcy_ax"] == pytest.approx(0.8, rel=1e-5)  # 1 - 0.5 * 40 / 100
    assert r["effcy_vol"] == pytest.approx(0.75, rel=1e-5)


def test_missed_and_false_positive():
    r = _run(_em(GT[:3]), _em(GT))
    assert (r["prec"], r["rec"], r["jac"]) == (1.0, 0.75, 0.75)
    assert r["f1"] == pytest.approx(2 * 0.75 / 1.75)
    r = _run(_em(GT + [[30.0, 30.0, 0.0]]), _em(GT))
    assert (r["prec"], r["rec"], r["jac"]) == (0.8, 1.0, 0.8)
    assert (r["n_tp"], r["n_fp"], r["n_fn"]) == (4, 1, 0)


def test_bg_only_where_both_have_it():
    out = _em(GT, bg=[5.0, float("nan"), 7.0, 9.0])
    r = _run(out, _em(GT, bg=[4.0, 4.0, 4.0, float("nan")]))
    assert r["rmse_bg"] == pytest.approx(math.sqrt((1 + 9) / 2))
    assert math.isnan(_run(_em(GT), _em(GT))["rmse_bg"])  # no bg in the output set


def _all_nan(r, keys):
    return all(math.isnan(r[k]) for k in keys)


DIST_KEYS = ("rmse_lat", "rmse_ax", "rmse_vol", "mad_lat", "mad_ax", "mad_vol", "effcy_lat", "effcy_ax",
             "effcy_vol", "rmse_phot", "mad_phot", "rmse_bg")


def test_empty_output():
    r = _run(EmitterSet.empty(px_size=PX), _em(GT))
    assert math.isnan(r["prec"]) and r["rec"] == 0.0 and r["jac"] == 0.0 and math.isnan(r["f1"])
    assert _all_nan(r, DIST_KEYS)


def test_empty_ground_truth():
    r = _run(_em(GT), EmitterSet.empty(px_size=PX))
    assert r["prec"] == 0.0 and math.isnan(r["rec"]) and r["jac"] == 0.0 and math.isnan(r["f1"])
    assert _all_nan(r, DIST_KEYS)


def test_both_empty():
    tp, fp, fn, tpm = GreedyHungarianMatching().forward(EmitterSet.empty(), EmitterSet.empty())
    assert len(tp) == len(fp) == len(fn) == len(tpm) == 0
    r = evaluate(tp, fp, fn, tpm)
    assert _all_nan(r, ("prec", "rec", "jac", "f1") + DIST_KEYS)


def test_no_true_positive():
    r = _run(_em([[1.0, 1.0, 0.0]]), _em([[10.0, 10.0, 0.0]]))
    assert (r["prec"], r["rec"], r["jac"]) == (0.0, 0.0, 0.0)
    assert math.isnan(r["f1"])  # precision + recall = 0: DECODE gives nan, not 0
    assert _all_nan(r, DIST_KEYS)


def test_counts_helpers():
    assert all(math.isnan(v) for v in precision_recall_jaccard(0, 0, 0))
    assert efficiency(1.0, 0.0, 1.0) == 1.0
    assert efficiency(0.91204, 32.077, 1.0) == pytest.approx(0.66739, abs=1e-4)  # DECODE's own test value
    seg = SegmentationEvaluation().forward(_em(GT[:2]), _em(GT[:1]), _em(GT[:1]))
    assert seg.prec == pytest.approx(2 / 3) and seg.jac == 0.5
    d = DistanceEvaluation().forward(_em([[0.0, 0.0, 0.0]]), _em([[0.3, 0.4, 0.0]]))
    assert d.rmse_lat == pytest.approx(50.0) and d.mad_lat == pytest.approx(70.0)


# matching ---------------------------------------------------------------------------------------
def test_distance_limits_inclusive_and_per_axis():
    tar = _em([[0.0, 0.0, 0.0]])
    m = GreedyHungarianMatching(match_dims=3, dist_lat=250.0, dist_ax=500.0)
    assert len(m.forward(_em([[2.5, 0.0, 0.0]]), tar).tp) == 1  # exactly at the limit
    assert len(m.forward(_em([[2.51, 0.0, 0.0]]), tar).tp) == 0
    assert len(m.forward(_em([[0.0, 0.0, 500.0]]), tar).tp) == 1
    assert len(m.forward(_em([[0.0, 0.0, 501.0]]), tar).tp) == 0
    vol = GreedyHungarianMatching(match_dims=3, dist_lat=None, dist_ax=None, dist_vol=300.0)
    assert len(vol.forward(_em([[1.8, 0.0, 240.0]]), tar).tp) == 1  # 300 nm in 3D
    assert len(vol.forward(_em([[1.8, 0.0, 250.0]]), tar).tp) == 0


def test_match_dims_2_ranks_by_lateral_distance():
    tar = _em([[0.0, 0.0, 0.0], [1.0, 0.0, 400.0]])
    out = _em([[0.9, 0.0, 0.0]])
    assert GreedyHungarianMatching(match_dims=2, dist_lat=250.0, dist_ax=500.0).forward(out, tar).tp_match.xyz[
        0, 0] == 1.0
    assert GreedyHungarianMatching(match_dims=3, dist_lat=250.0, dist_ax=500.0).forward(out, tar).tp_match.xyz[
        0, 0] == 0.0


def test_ties_break_by_lower_index():
    m = GreedyHungarianMatching(match_dims=2, dist_lat=250.0, dist_ax=None)
    res = m.forward(_em([[1.0, 0.0, 0.0]]), _em([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], id=[7, 8]))
    assert res.tp_match.id.tolist() == [7] and res.tp.id.tolist() == [7]
    res = m.forward(_em([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], phot=[1.0, 2.0]), _em([[1.0, 0.0, 0.0]]))
    assert res.tp.phot.tolist() == [1.0] and res.fp.phot.tolist() == [2.0]


def test_greedy_takes_closest_pair_first():
    # out 1 is 0.5 px from target 0; out 0 loses target 0 and takes target 1 (farther, within limit)
    out = _em([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], phot=[1.0, 2.0])
    tar = _em([[1.0, 0.0, 0.0], [-1.2, 0.0, 0.0]], id=[10, 11])
    res = GreedyHungarianMatching(match_dims=2, dist_lat=150.0, dist_ax=None).forward(out, tar)
    pairs = sorted(zip(res.tp.phot.tolist(), res.tp_match.id.tolist()))
    assert pairs == [(1.0, 11), (2.0, 10)]


def test_frames_are_matched_separately_and_units_mix():
    out = _em([[1.0, 1.0, 0.0], [4.0, 4.0, 0.0]], frame_ix=[3, 5])
    tar_nm = EmitterSet(torch.tensor([[100.0, 100.0, 0.0], [400.0, 400.0, 0.0]]), torch.ones(2),
                        torch.tensor([3, 4]), xy_unit="nm", px_size=PX)
    res = GreedyHungarianMatching(match_dims=3, dist_lat=250.0, dist_ax=500.0).forward(out, tar_nm)
    assert res.tp.frame_ix.tolist() == [3] and res.fp.frame_ix.tolist() == [5] and res.fn.frame_ix.tolist() == [4]


def test_px_units_need_px_size():
    em = EmitterSet(torch.zeros(1, 3), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="px_size"):
        GreedyHungarianMatching().forward(em, em)


def _random_sets(seed, n_frames=30, n_out=120, n_tar=100, grid=False):
    g = torch.Generator().manual_seed(seed)

    def one(n):
        if grid:  # integer coordinates: many exact distance ties
            xy = torch.randint(0, 8, (n, 2), generator=g).float()
            z = torch.randint(-2, 3, (n, 1), generator=g).float() * 100
        else:
            xy = torch.rand(n, 2, generator=g) * 12
            z = (torch.rand(n, 1, generator=g) - 0.5) * 1000
        return EmitterSet(torch.cat([xy, z], 1), torch.rand(n, generator=g) * 5000,
                          torch.randint(0, n_frames, (n,), generator=g), bg=torch.rand(n, generator=g) * 50,
                          xy_unit="px", px_size=PX)

    return one(n_out), one(n_tar)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dims=st.sampled_from([2, 3]), grid=st.booleans())
def test_matching_invariants(seed, dims, grid):
    out, tar = _random_sets(seed, n_frames=8, n_out=40, n_tar=35, grid=grid)
    m = GreedyHungarianMatching(match_dims=dims, dist_lat=250.0, dist_ax=300.0)
    tp, fp, fn, tpm = m.forward(out, tar)
    assert len(tp) + len(fp) == len(out) and len(tp) + len(fn) == len(tar)
    assert torch.equal(tp.frame_ix, tpm.frame_ix)
    assert torch.equal(tp.id, tpm.id)
    assert bool(m.filter(tp.xyz_nm, tpm.xyz_nm).diagonal().all())
    # maximal: no unmatched output / target pair on one frame is within the limits
    for f in set(fp.frame_ix.tolist()) & set(fn.frame_ix.tolist()):
        a, b = fp[fp.frame_ix == f], fn[fn.frame_ix == f]
        assert not bool(m.filter(a.xyz_nm, b.xyz_nm).any())


def test_parse():
    p = types.SimpleNamespace(Evaluation=types.SimpleNamespace(match_dims=2, dist_lat=100.0, dist_ax=None,
                                                               dist_vol=None))
    m = GreedyHungarianMatching.parse(p)
    assert (m.match_dims, m.dist_lat, m.dist_ax, m.dist_vol) == (2, 100.0, None, None)
    with pytest.raises(ParamError):
        GreedyHungarianMatching(match_dims=4)
    with pytest.raises(ParamError):
        GreedyHungarianMatching(dist_lat=-1.0)


@pytest.mark.decode
@pytest.mark.skipif(not decode_available(), reason="real DECODE 0.10 is not importable")
@pytest.mark.parametrize("seed,grid,dims,kw", [
    (0, False, 3, dict(dist_lat=250.0, dist_ax=500.0)),
    (1, False, 2, dict(dist_lat=150.0, dist_ax=None)),
    (2, True, 3, dict(dist_lat=250.0, dist_ax=300.0)),
    (3, True, 2, dict(dist_lat=200.0, dist_ax=None, dist_vol=None)),
    (4, False, 3, dict(dist_lat=None, dist_ax=None, dist_vol=400.0)),
])
def test_same_as_decode(seed, grid, dims, kw):
    from decode.evaluation import evaluation as d_eval, match_emittersets as d_match
    from decode.evaluation.metric import efficiency as d_efficiency
    from decode.generic.emitter import EmitterSet as DEmitterSet

    out, tar = _random_sets(seed, grid=grid)

    def native(em):
        return DEmitterSet(xyz=em.xyz, phot=em.phot, frame_ix=em.frame_ix, id=em.id, bg=em.bg, xy_unit=em.xy_unit,
                           px_size=em.px_size)

    ours = GreedyHungarianMatching(match_dims=dims, **kw).forward(out, tar)
    theirs = d_match.GreedyHungarianMatching(match_dims=dims, **kw).forward(native(out), native(tar))
    for a, b in zip(ours, theirs):
        assert len(a) == len(b)
        assert torch.equal(a.xyz, b.xyz) and torch.equal(a.frame_ix, b.frame_ix) and torch.equal(a.id, b.id)
    assert len(ours.tp) > 10 and len(ours.fp) > 0 and len(ours.fn) > 0

    r = evaluate(*ours)
    seg = d_eval.SegmentationEvaluation().forward(theirs.tp, theirs.fp, theirs.fn)
    dist = d_eval.DistanceEvaluation().forward(theirs.tp, theirs.tp_match)
    for k, v in list(seg._asdict().items()) + list(dist._asdict().items()):
        assert r[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert r["effcy_lat"] == pytest.approx(d_efficiency(seg.jac, dist.rmse_lat, 1.0), rel=1e-6)
    assert r["effcy_ax"] == pytest.approx(d_efficiency(seg.jac, dist.rmse_ax, 0.5), rel=1e-6)
