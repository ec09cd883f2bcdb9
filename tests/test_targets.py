import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from decode_var.backend import get_backend
from decode_var.backend.builtin import BuiltinBackend
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ShapeError
from decode_var.config.param import param_from_dict
from decode_var.core.scales import ScaleSchedule
from decode_var.data.targets import (MultiScaleTargets, SimpleWeight, TargetRescale, UnifiedEmbeddingTarget,
                                resample_bg)

EXT = (-0.5, 39.5)


def em_of(rows, frames=None):
    rows = torch.tensor(rows, dtype=torch.float32)
    frames = torch.zeros(len(rows), dtype=torch.long) if frames is None else torch.tensor(frames)
    return EmitterSet(rows[:, :3], rows[:, 3], frames)


def test_single_emitter_target_values():
    tg = UnifiedEmbeddingTarget(EXT, EXT, (40, 40), roi_size=3)
    t = tg.forward(em_of([[10.2, 20.4, -100.0, 5000.0]]), None, 0, 0)
    assert t.shape == (1, 5, 40, 40)
    assert t[0, 0].sum() == 1 and t[0, 0, 10, 20] == 1
    assert torch.allclose(t[0, 2, 10, 20], torch.tensor(0.2), atol=1e-5)
    assert torch.allclose(t[0, 3, 10, 20], torch.tensor(0.4), atol=1e-5)
    # the ROI neighbour one cell up in x: offset relative to *that* cell's centre
    assert torch.allclose(t[0, 2, 11, 20], torch.tensor(-0.8), atol=1e-5)
    assert (t[0, 1] > 0).sum() == 9 and t[0, 1, 9, 19] == 5000.0
    assert t[0, 4, 11, 21] == -100.0 and t[0, 4, 12, 20] == 0.0


def test_pixel_border_goes_to_upper_cell_and_fov_is_half_open():
    tg = UnifiedEmbeddingTarget(EXT, EXT, (40, 40), roi_size=3)
    t = tg.forward(em_of([[0.5, 3.0, 0.0, 1.0], [39.5, 3.0, 0.0, 1.0], [-0.5, 5.0, 0.0, 1.0]]), None, 0, 0)
    assert t[0, 0, 1, 3] == 1 and t[0, 2, 1, 3] == -0.5
    assert t[0, 0, 0, 5] == 1  # lower edge is inside
    assert t[0, 0].sum() == 2  # x = 39.5 is outside


def test_frames_outside_range_are_dropped_and_shifted():
    tg = UnifiedEmbeddingTarget(EXT, EXT, (40, 40), roi_size=1)
    t = tg.forward(em_of([[5.0, 5.0, 0.0, 1.0]] * 3, frames=[2, 3, 7]), None, 3, 5)
    assert t.shape[0] == 3 and t[:, 0].sum() == 1 and t[0, 0, 5, 5] == 1


def test_overlap_rule_of_weights():
    w = SimpleWeight(EXT, EXT, (40, 40), roi_size=3)
    em = em_of([[10.0, 10.0, 0.0, 1.0], [12.0, 10.0, 0.0, 1.0]])
    target = torch.zeros(1, 6, 40, 40)
    weight = w.forward(em, target, 0, 0)
    assert torch.all(weight[:, [0, 5]] == 1)
    roi = weight[0, 1]
    assert torch.equal(roi, weight[0, 4])
    assert roi[11, 10] == 0 and roi[11, 9] == 0  # shared by both ROIs
    assert roi[10, 10] == 1 and roi[12, 10] == 1  # central cells kept
    assert roi[9, 9] == 1 and roi[13, 11] == 1
    assert roi.sum() == 9 + 9 - 2 * 3


def test_central_cell_kept_when_inside_other_roi():
    w = SimpleWeight(EXT, EXT, (40, 40), roi_size=3)
    weight = w.forward(em_of([[10.0, 10.0, 0.0, 1.0], [11.0, 10.0, 0.0, 1.0]]), torch.zeros(1, 6, 40, 40), 0, 0)
    assert weight[0, 1, 10, 10] == 1 and weight[0, 1, 11, 10] == 1 and weight[0, 1, 10, 11] == 0


def test_weight_shape_errors():
    w = SimpleWeight(EXT, EXT, (40, 40), roi_size=3)
    with pytest.raises(ShapeError, match=r"\(N, 6, H, W\)"):
        w.forward(em_of([[1.0, 1.0, 0.0, 1.0]]), torch.zeros(1, 5, 40, 40), 0, 0)
    with pytest.raises(ShapeError, match="frames"):
        w.forward(em_of([[1.0, 1.0, 0.0, 1.0]]), torch.zeros(2, 6, 40, 40), 0, 0)


emitter_rows = st.lists(st.tuples(st.floats(-1.0, 40.5), st.floats(-1.0, 40.5), st.floats(-750, 750),
                                  st.floats(0, 1e5), st.integers(-1, 3)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(rows=emitter_rows, factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]), roi=st.sampled_from([1, 3, 5]))
@example(rows=[(0.0, 0.0, 0.0, 0.0, 0), (0.0, -1.175494351e-38, 0.0, 0.0, 0)], factor=2.0, roi=1)  # just below an edge
def test_target_properties(rows, factor, roi):
    sched = ScaleSchedule((40, 40), [factor])
    sc = sched.finest
    em = EmitterSet(torch.tensor([r[:3] for r in rows]).reshape(-1, 3), torch.tensor([r[3] for r in rows]),
                    torch.tensor([r[4] for r in rows], dtype=torch.long))
    t = UnifiedEmbeddingTarget(sc.xextent, sc.yextent, sc.img_shape, roi).forward(em, None, 0, 2)
    w = SimpleWeight(sc.xextent, sc.yextent, sc.img_shape, roi).forward(em, torch.cat([t, t[:, :1]], 1), 0, 2)
    xyz = em.xyz
    inside = ((xyz[:, 0] >= -0.5) & (xyz[:, 0] < 39.5) & (xyz[:, 1] >= -0.5) & (xyz[:, 1] < 39.5)
              & (em.frame_ix >= 0) & (em.frame_ix <= 2))
    def cell(v, size, n):  # count the (exactly representable) inner edges at or below v: no rounding of v
        return sum(1 for k in range(1, n) if -0.5 + k * size <= v)

    cells = {(int(f), cell(x, sc.cell_size[0], sc.img_shape[0]), cell(y, sc.cell_size[1], sc.img_shape[1]))
             for (x, y, _), f in zip(xyz[inside].tolist(), em.frame_ix[inside].tolist())}
    assert int(t[:, 0].sum()) == len(cells)
    central = t[:, 0] == 1
    if roi == 1:  # with larger ROIs a neighbour's ROI may overwrite a central cell (DECODE does the same)
        assert torch.all(t[:, 2][central].abs() <= 0.5 * sc.cell_size[0] + 1e-4)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(w[:, 1:5][central.unsqueeze(1).expand(-1, 4, -1, -1)] == 1)
    assert torch.all(w[:, [0, 5]] == 1)


def test_resample_bg_mean_and_nearest():
    bg = torch.arange(16.0).view(1, 4, 4)
    assert torch.allclose(resample_bg(bg, (2, 2)), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    fine = resample_bg(bg, (8, 8))
    assert fine[0, 0, 0] == 0 and fine[0, 1, 1] == 0 and fine[0, 7, 7] == 15


def test_rescale_round_trip_and_cell_units():
    r = TargetRescale(phot_max=1000.0, z_max=500.0, bg_max=100.0)
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(r.inverse(r.forward(x, (4.0, 4.0)), (4.0, 4.0)), x, atol=1e-6)
    assert torch.allclose(r.forward(torch.ones(1, 6, 1, 1), (0.5, 0.5)).flatten(),
                          torch.tensor([1.0, 1e-3, 2.0, 2.0, 2e-3, 1e-2]))


def test_multiscale_targets_on_every_grid():
    p = param_from_dict({"VAR": {"scales": [0.25, 0.5, 1.0, 2.0]}})
    backend = get_backend("builtin")
    batch = backend.simulator(p).sample(4, seed=3)
    targets, weights = MultiScaleTargets.parse(p, backend)(batch.em, batch.bg_NHW, 4)
    assert [tuple(t.shape) for t in targets] == [(4, 6, 10, 10), (4, 6, 20, 20), (4, 6, 40, 40), (4, 6, 80, 80)]
    assert all(t.shape == w.shape for t, w in zip(targets, weights))
    n_labelled = int((batch.em.phot >= p.HyperParameter.emitter_label_photon_min).sum())
    assert int(targets[-1][:, 0].sum()) == n_labelled  # 0.5 px cells: no two emitters share one here
    for t in targets:  # background in network units, the same on every grid
        assert torch.allclose(t[:, 5].mean(dim=(1, 2)), batch.bg_NHW[:, 0, 0] / p.Scaling.bg_max, atol=1e-5)
        assert t[:, 2].abs().max() <= 1.5 + 1e-5  # offsets in cells: within the 3-cell ROI on every grid


# ------------------------------------------------------------------------------------------------
# The built-in backend against real DECODE 0.10 (skipped when DECODE is absent)
# ------------------------------------------------------------------------------------------------

def _random_sets(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([41.0, 41.0, 1500.0]) - torch.tensor([1.0, 1.0, 750.0])
    xyz[:10, :2] = torch.round(xyz[:10, :2] * 2) / 2  # on pixel (and half-pixel) borders
    xyz[10:20, :2] = xyz[20:30, :2] + torch.rand(10, 2, generator=g) * 1.5  # overlapping ROIs
    phot = torch.rand(n, generator=g) * 1e4
    frame_ix = torch.randint(-1, 5, (n,), generator=g)  # frames outside 0..3 and empty frames
    return EmitterSet(xyz, phot, frame_ix, px_size=(100.0, 100.0))


@pytest.mark.decode
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("roi", [3, 5])
def test_builtin_equals_decode_at_every_scale(seed, roi):
    from decode_var.backend import get_backend

    dec, builtin = get_backend("decode"), BuiltinBackend()
    sched = ScaleSchedule((40, 40), [0.25, 0.5, 1.0, 2.0])
    em = _random_sets(seed)
    for sc in sched:
        bg = torch.rand(4, *sc.img_shape) * 100
        t_dec = dec.target_generator(sc, roi).forward(dec.to_native(em), None, 0, 3)
        t_bin = builtin.target_generator(sc, roi).forward(em, None, 0, 3)
        t_dec = torch.cat([t_dec, bg.unsqueeze(1)], 1)
        t_bin = torch.cat([t_bin, bg.unsqueeze(1)], 1)
        w_dec = dec.weight_generator(sc, roi).forward(dec.to_native(em), t_dec, 0, 3)
        w_bin = builtin.weight_generator(sc, roi).forward(em, t_bin, 0, 3)
        assert torch.allclose(t_dec, t_bin, atol=1e-6), sc
        assert torch.allclose(w_dec, w_bin, atol=1e-6), sc


@pytest.mark.decode
def test_multiscale_targets_backends_agree_on_simulated_batch():
    p = param_from_dict({"VAR": {"scales": [0.25, 0.5, 1.0, 2.0]}})
    batch = BuiltinBackend().simulator(p).sample(8, seed=11)
    out = [MultiScaleTargets.parse(p, b)(batch.em, batch.bg_NHW, 8) for b in (BuiltinBackend(), get_backend("decode"))]
    for a, b in zip(out[0][0] + out[0][1], out[1][0] + out[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_shared_cells_hold_the_last_emitter_on_every_thread_count():
    """Cells that several ROIs cover hold the last emitter's values (the sequential result), whatever the
    number of threads: a large batch of emitters crowded on a coarse grid, written twice with 1 and 2 threads."""
    g = torch.Generator().manual_seed(3)
    n_frames, per_frame = 256, 30
    xyz = torch.rand(n_frames * per_frame, 3, generator=g) * torch.tensor([40.0, 40.0, 0.0]) - 0.5
    phot = torch.arange(n_frames * per_frame, dtype=torch.float32) + 1.0  # distinct: the winner is visible
    frames = torch.arange(n_frames).repeat_interleave(per_frame)
    em = EmitterSet(xyz, phot, frames)
    tg = UnifiedEmbeddingTarget(EXT, EXT, (10, 10), roi_size=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tg.forward(em, None, 0, n_frames - 1)
        torch.set_num_threads(2)
        two = tg.forward(em, None, 0, n_frames - 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # sequential reference: every emitter's ROI written in order, later emitters overwrite
    ref = torch.zeros(n_frames, 10, 10)
    x_ix, y_ix = tg.bin_index(em.xyz_px)
    for i in range(len(em)):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                cx, cy = int(x_ix[i]) + dx, int(y_ix[i]) + dy
                if 0 <= cx < 10 and 0 <= cy < 10:
                    ref[int(frames[i]), cx, cy] = phot[i]
    assert torch.equal(one[:, 1], ref)
