"""Sparse coarse-to-fine inference (decode_var.nn.sparse) against the dense eval forward."""
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.config.param import load_param
from decode_var.core.scales import ScaleSchedule
from decode_var.evaluation.postprocessing import SpatialIntegration
from decode_var.nn import sparse
from decode_var.nn.model import VARMultiScale
QUICKSTART = Path(__file__).resolve().parents[1] / "decode_var" / "config" / "var_quickstart.yaml"


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = VARMultiScale(3, ScaleSchedule((40, 40), [0.25, 0.5, 1.0]), features=16, token_dim=32, **kw).eval()
    return m


def _frames(hw=(40, 48), n=2, seed=1):
    """Gaussian spots isolated, clustered (two 1.5 px apart) and on the frame's edges, on a background."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.arange(hw[0], dtype=torch.float32)[:, None]
    ys = torch.arange(hw[1], dtype=torch.float32)[None, :]
    spots = [(10.3, 12.7), (25.0, 30.0), (26.5, 30.0), (0.2, 20.0), (hw[0] - 0.6, hw[1] - 0.4), (18.0, 0.1)]
    img = torch.zeros(hw)
    for x, y in spots:
        img += 4.0 * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 2.0)
    frames = img[None, None].repeat(n, 3, 1, 1) + 0.2 * torch.randn((n, 3) + hw, generator=g)
    return frames, spots


def test_everything_active_equals_dense():
    m = _model()
    x, _ = _frames()
    with torch.no_grad():
        dense = m(x)
        stats = {}
        sp = sparse.sparse_forward(m, x, threshold=-1.0, max_cost=math.inf, stats=stats)
    assert stats["path"] == "sparse" and stats["active_share"] == 1.0
    assert sp.shape == dense.shape
    torch.testing.assert_close(sp, dense, rtol=0, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(q=st.floats(0.3, 0.95), seed=st.integers(0, 5), ring=st.integers(0, 3),
       hw=st.sampled_from([(40, 40), (36, 52), (64, 24)]))
def test_computed_cells_equal_dense(q, seed, ring, hw):
    """Whatever the threshold, the ring and the frame size, every cell the sparse path computes holds the
    dense path's values; every other cell says 'no emitter'."""
    m = _model(seed)
    x, _ = _frames(hw, seed=seed)
    with torch.no_grad():
        dense = m(x)
        p_coarse = torch.sigmoid(m.predict_scales(x, None, None)[0][:, 0])
        stats = {}
        sp = sparse.sparse_forward(m, x, threshold=float(p_coarse.quantile(q)), ring=ring, max_cost=math.inf,
                                   stats=stats)
    done = stats["computed_NHW"]
    assert 0 < done.sum() < done.numel()
    torch.testing.assert_close(sp[done[:, None].expand_as(sp)], dense[done[:, None].expand_as(dense)],
                               rtol=0, atol=1e-5)
    assert (sp[:, 0][~done] == 0).all() and (sp[:, 1:5].permute(1, 0, 2, 3)[:, ~done] == 0).all()


def _localizations(out, hw):
    post = SpatialIntegration(raw_th=0.5, xextent=(-0.5, hw[0] - 0.5), yextent=(-0.5, hw[1] - 0.5), img_shape=hw)
    return post.forward(out)


def test_no_detection_in_active_cells_is_lost_or_moved():
    """Frames with isolated, clustered and edge spots: every dense localization in (or next to) a coarse cell
    that passed the threshold is found by the sparse path at the same place with the same values, and the
    sparse path finds nothing there that the dense path does not. The finest p bias is raised so that the
    (untrained) model detects something in many cells, and the threshold leaves a third of the coarse
    cells active, frame edges included."""
    m = _model(3)
    m.heads[-1].bias.data[0] += 5.0
    hw = (40, 48)
    x, _ = _frames(hw, n=3, seed=3)
    with torch.no_grad():
        p_coarse = torch.sigmoid(m.predict_scales(x, None, None)[0][:, 0])
        stats = {}
        sp = sparse.sparse_forward(m, x, threshold=float(p_coarse.quantile(0.67)), max_cost=math.inf, stats=stats)
        dense = m(x)
    active = stats["active_NHW"]
    assert active[:, 0].any() and active[:, -1].any() and active[:, :, 0].any() and active[:, :, -1].any()
    near = sparse.dilate(active, 1)
    assert 0.05 < stats["active_share"] < 0.9

    def inside(em):
        ix = (em.xyz_px[:, 0] + 0.5).floor().long().clamp(0, hw[0] - 1)
        iy = (em.xyz_px[:, 1] + 0.5).floor().long().clamp(0, hw[1] - 1)
        return em[near[em.frame_ix, ix, iy]]

    em_d, em_s = inside(_localizations(dense, hw)), inside(_localizations(sp, hw))
    assert len(em_d) >= 10  # the check is not vacuous
    assert len(em_s) == len(em_d)
    order_d = torch.argsort(em_d.frame_ix * 1e6 + em_d.xyz_px[:, 0] * 1e3 + em_d.xyz_px[:, 1])
    order_s = torch.argsort(em_s.frame_ix * 1e6 + em_s.xyz_px[:, 0] * 1e3 + em_s.xyz_px[:, 1])
    torch.testing.assert_close(em_s.xyz_px[order_s], em_d.xyz_px[order_d], rtol=0, atol=1e-3)
    torch.testing.assert_close(em_s.phot[order_s], em_d.phot[order_d], rtol=1e-4, atol=1e-3)


def test_dense_fallback_is_the_dense_forward_bit_for_bit():
    m = _model()
    x, _ = _frames()
    with torch.no_grad():
        stats = {}
        out = sparse.sparse_forward(m, x, threshold=-1.0, stats=stats)  # everything active: dense pays
        dense = m(x)
    assert stats["path"] == "dense" and stats["cost_ratio"] >= 1.0
    assert torch.equal(out, dense)


@pytest.mark.parametrize("conditioning", ["next_scale", "independent"])
def test_sparse_with_uncertainty_and_ablations(conditioning):
    m = _model(conditioning=conditioning, uncertainty=True)
    m.sigma_scale.copy_(torch.tensor([1.5, 0.5, 2.0, 1.2]))  # a calibrated model: the sparse path scales alike
    assert sparse.supports_sparse(m)
    x, _ = _frames()
    with torch.no_grad():
        stats = {}
        sp = sparse.sparse_forward(m, x, threshold=-1.0, max_cost=math.inf, stats=stats)
        dense = m(x)
        torch.testing.assert_close(sp, dense, rtol=0, atol=1e-5)
        assert sp.shape[1] == 10
        p_coarse = torch.sigmoid(m.predict_scales(x, None, None)[0][:, 0])
        part = sparse.sparse_forward(m, x, threshold=float(p_coarse.quantile(0.6)), max_cost=math.inf, stats=stats)
        nothing = sparse.sparse_forward(m, x, threshold=1.0, max_cost=math.inf)
    done = stats["computed_NHW"][:, None].expand_as(part)
    assert 0 < stats["active_share"] < 1
    torch.testing.assert_close(part[done], dense[done], rtol=0, atol=1e-5)
    assert nothing.shape == dense.shape and (nothing[:, 0] == 0).all()
    assert not sparse.supports_sparse(_model(conditioning="single"))


def test_predictor_runs_dense_by_default_and_sparse_on_request(tmp_path):
    from decode_var.inference.predictor import Predictor
    from decode_var.training.checkpoint import save_model
    from decode_var.training.components import build

    param = load_param(QUICKSTART)
    save_model(tmp_path / "model.pt", build(param).model)
    assert Predictor(param, tmp_path / "model.pt").sparse_threshold is None
    assert Predictor(param, tmp_path / "model.pt", sparse=True).sparse_threshold == sparse.DEFAULT_THRESHOLD


def test_decode_var_fit_sparse_gives_the_dense_localizations(tmp_path):
    """``decode-var-fit --sparse`` is honoured: with an untrained model whose finest p bias is raised (it detects
    many cells) and whose coarse scale doubts most of them, the sparse fit keeps a subset of the dense fit's
    localizations, at the same places."""
    import numpy as np
    import tifffile

    from decode_var.data.emitter_io import load_emitters
    from decode_var.fit import main as fit_main
    from decode_var.training.checkpoint import save_model
    from decode_var.training.components import build

    param = load_param(QUICKSTART)
    model = build(param).model
    model.heads[-1].bias.data[0] += 8.0
    save_model(tmp_path / "model.pt", model)
    frames, _ = _frames((48, 40), n=4)
    tifffile.imwrite(tmp_path / "s.tif", (100 + 50 * frames[:, 1]).clamp(0, 65535).round().numpy().astype(np.uint16),
                     photometric="minisblack")
    common = ["-p", str(QUICKSTART), "--model", str(tmp_path / "model.pt"), "--frames", str(tmp_path / "s.tif"),
              "--no-render", "--no-progress"]
    assert fit_main(common + ["--out", str(tmp_path / "dense.csv")]) == 0
    assert fit_main(common + ["--out", str(tmp_path / "sparse.csv"), "--sparse"]) == 0
    dense, sp = load_emitters(tmp_path / "dense.csv"), load_emitters(tmp_path / "sparse.csv")
    # the untrained coarse scale doubts most cells: the sparse fit refines fewer, and finds a subset, in place
    assert 0 <= len(sp) < len(dense)
    for i in range(len(sp)):
        same = (dense.frame_ix == sp.frame_ix[i]) & ((dense.xyz_px[:, :2] - sp.xyz_px[i, :2]).abs().max(1).values < 1e-3)
        assert same.any()
