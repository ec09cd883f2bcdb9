"""VARMultiScale: shapes per scale, block-causality, teacher forcing, eval range, autocast,
odd frame sizes, checkpoints, parse; and (marked ``decode``) DECODE's post-processing and Infer."""
import io
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from decode_var.core.errors import CheckpointError, ParamError, ShapeError
from decode_var import registry
from decode_var.nn.model import VARMultiScale
from decode_var.nn.blocks import (RefineStage, ScaleTransformer, WindowLayout, recentre, recentre_upsample,
                                     resample, upsample_cells)
from decode_var.core.scales import ScaleSchedule
from decode_var.training.components import build
from decode_var.training.tasks import scale_factors

FACTORS = [0.25, 0.5, 1.0, 2.0]
TINY = dict(features=4, token_dim=8, depth=1, heads=2, window=2)


def tiny(channels_in=3, factors=FACTORS, size=16, **kw):
    torch.manual_seed(0)
    return VARMultiScale(channels_in, ScaleSchedule((size, size), factors), **{**TINY, **kw})


def frames(n=2, c=3, size=16, seed=1):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def targets_for(model, n=2, size=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in ScaleSchedule((size, size), model.schedule.factors):
        t = torch.randn(n, 6, *s.img_shape, generator=g) * 0.3
        t[:, 0] = (torch.rand(n, *s.img_shape, generator=g) < 0.1).float()
        out.append(t)
    return out


# ------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("channels_in", [1, 3])
def test_train_output_one_raw_map_per_scale(channels_in):
    m = tiny(channels_in).train()
    outs = m(frames(c=channels_in))
    assert [tuple(o.shape) for o in outs] == [(2, 6, 4, 4), (2, 6, 8, 8), (2, 6, 16, 16), (2, 6, 32, 32)]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
    # p is a logit in train mode: the sigmoid is left to the loss
    assert min(o[:, 0].min().item() for o in outs) < 0


def test_inactive_scales_are_not_computed():
    m = tiny().train()
    calls = []
    for k, head in enumerate(m.heads):
        head.register_forward_hook(lambda mod, inp, out, k=k: calls.append(k))
    outs = m(frames(), n_active=2)
    assert [o.shape[-1] for o in outs] == [4, 8]
    assert calls == [0, 1]
    assert m(frames(), n_active=2)[1].equal(outs[1])


def test_single_ablation_predicts_only_the_finest_scale():
    m = tiny(conditioning="single").train()
    assert m.schedule.factors == (2.0,)
    outs = m(frames())
    assert len(outs) == 1 and outs[0].shape == (2, 6, 32, 32)


def test_the_single_ablation_says_which_scale_it_predicts():
    """``predicted_factors`` is what the task builds targets and the loss for (VAR.scales lists three)."""
    param = make_param(conditioning="single")
    m = VARMultiScale.parse(param)
    assert m.predicted_factors() == [1.0] and m.progressive
    assert scale_factors(param, m) == [1.0]
    parts = build(param)  # the ablation is built, its param untouched: targets and loss for its one scale
    assert list(param.VAR.scales) == [0.25, 0.5, 1.0] and parts.schedule.factors == (1.0,)
    assert parts.loss.n_scales == 1 and len(parts.task.targets.schedule) == 1
    full = make_param()
    assert scale_factors(full, VARMultiScale.parse(full)) == [float(f) for f in full.VAR.scales]


def test_wrong_channel_count_is_a_shape_error():
    with pytest.raises(ShapeError, match="channels_in = 3"):
        tiny()(frames(c=1))


# ---------------------------------------------------------------------------- eval output
def test_eval_returns_finest_scale_with_p_probability():
    m = tiny()
    x = frames()
    m.train()
    raw = m.predict_scales(x)[-1]
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 6, 32, 32)
    assert (y[:, 0] >= 0).all() and (y[:, 0] <= 1).all()
    # train and eval share the free-running path when no targets are given
    torch.testing.assert_close(y[:, 0], torch.sigmoid(raw[:, 0]).detach())
    torch.testing.assert_close(y[:, 1:], raw[:, 1:].detach())


def test_eval_output_range_holds_for_extreme_inputs():
    m = tiny().eval()
    with torch.no_grad():
        y = m(frames() * 1e4)
    assert torch.isfinite(y).all()
    assert (y[:, 0] >= 0).all() and (y[:, 0] <= 1).all()


# ----------------------------------------------------------------------- block causality
@pytest.mark.parametrize("k", [0, 1, 2])
def test_perturbing_what_only_finer_scales_see_leaves_coarser_predictions(k):
    """The target of scale k is an input of scales > k only (teacher forcing)."""
    m = tiny(teacher_forcing=1.0).train()
    x, t = frames(), targets_for(tiny())
    base = m(x, targets=t)
    t2 = [tt.clone() for tt in t]
    t2[k] = t2[k] + torch.randn_like(t2[k])
    pert = m(x, targets=t2)
    for j in range(k + 1):
        assert pert[j].equal(base[j]), f"scale {j} changed when the target of scale {k} changed"
    assert not torch.allclose(pert[k + 1], base[k + 1])


def _tokens(layout, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [layout.partition(torch.randn(n, dim, layout.grid0[0] * r, layout.grid0[1] * r, generator=g), r)
            for r in layout.ratios]


@pytest.mark.parametrize("grid0", [(4, 4), (5, 3)])  # (5, 3): padded windows with masked keys
def test_transformer_mask_is_block_causal(grid0):
    torch.manual_seed(0)
    tr = ScaleTransformer(8, depth=2, heads=2, mlp_ratio=2.0, causal=True).eval()
    layout = WindowLayout(grid0, [1, 2, 4], window=2, device="cpu")
    toks = _tokens(layout, 2, 8, 0)
    base = tr.forward_parallel(toks, layout, 2)
    toks[1] = toks[1] + 5 * torch.randn_like(toks[1])
    pert = tr.forward_parallel(toks, layout, 2)
    assert pert[0].equal(base[0])
    assert not torch.allclose(pert[1], base[1]) and not torch.allclose(pert[2], base[2])


def test_independent_attention_sees_only_its_own_scale():
    torch.manual_seed(0)
    tr = ScaleTransformer(8, depth=1, heads=2, mlp_ratio=2.0, causal=False).eval()
    layout = WindowLayout((4, 4), [1, 2], window=2, device="cpu")
    toks = _tokens(layout, 2, 8, 0)
    base = tr.forward_parallel(toks, layout, 2)
    toks[0] = toks[0] + 5.0
    assert tr.forward_parallel(toks, layout, 2)[1].equal(base[1])


@pytest.mark.parametrize("grid0,causal", [((4, 4), True), ((5, 3), True), ((5, 3), False)])
def test_one_pass_under_the_mask_equals_scale_by_scale_with_cache(grid0, causal):
    torch.manual_seed(0)
    tr = ScaleTransformer(8, depth=2, heads=2, mlp_ratio=2.0, causal=causal).eval()
    layout = WindowLayout(grid0, [1, 2], window=2, device="cpu")
    toks = _tokens(layout, 3, 8, 1)
    par = tr.forward_parallel(toks, layout, 3)
    cache = tr.start_cache()
    seq = [tr.forward_step(t, k, cache, layout, 3) for k, t in enumerate(toks)]
    for a, b in zip(par, seq):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(g0x=st.integers(1, 7), g0y=st.integers(1, 7), window=st.integers(1, 5), ratio=st.sampled_from([1, 2, 3]))
def test_window_partition_and_merge_are_inverse(g0x, g0y, window, ratio):
    layout = WindowLayout((g0x, g0y), [ratio], window, "cpu")
    assert all(w <= window for w in layout.win0)
    grid = torch.randn(2, 3, g0x * ratio, g0y * ratio)
    tok = layout.partition(grid, ratio)
    assert tok.shape == (2 * layout.n_windows, layout.win0[0] * layout.win0[1] * ratio ** 2, 3)
    assert layout.merge(tok, ratio, 2).equal(grid)
    mask = layout.key_mask([0], 2)
    n_real = mask.sum().item() if mask is not None else tok.shape[0] * tok.shape[1]
    assert n_real == 2 * g0x * g0y * ratio ** 2


# ---------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_on_and_off():
    x = frames(n=4)
    t = targets_for(tiny(), n=4)
    m = tiny(teacher_forcing=1.0).train()
    forced = m(x, targets=t)
    m.teacher_forcing = 0.0
    free = m(x, targets=t)
    assert free[0].equal(forced[0])  # the coarsest scale has nothing coarser to condition on
    assert all(not torch.allclose(a, b) for a, b in zip(free[1:], forced[1:]))
    # without teacher forcing the targets are not read
    for a, b in zip(free, m(x)):
        assert a.equal(b)


def test_teacher_forcing_coin_is_per_sample_and_seeded():
    x = frames(n=8)
    t = targets_for(tiny(), n=8)
    m = tiny(seed=7).train()
    m.teacher_forcing = 1.0
    forced = m(x, targets=t)
    m.teacher_forcing = 0.0
    free = m(x, targets=t)
    m.teacher_forcing = 0.5
    mixed = m(x, targets=t)
    coin = torch.rand(8, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < coin.sum() < 8
    for k in range(1, len(mixed)):
        torch.testing.assert_close(mixed[k][coin], forced[k][coin], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[k][~coin], free[k][~coin], rtol=1e-5, atol=1e-6)
    # same seed, same coins, same result
    m2 = tiny(seed=7).train()
    m2.teacher_forcing = 0.5
    for a, b in zip(mixed, m2(x, targets=t)):
        assert a.equal(b)


def test_teacher_forcing_schedule_ramps_linearly():
    m = tiny(teacher_forcing=1.0, teacher_forcing_end=0.2, teacher_forcing_epochs=10)
    assert m.teacher_forcing == 1.0
    m.set_epoch(5)
    assert m.teacher_forcing == pytest.approx(0.6)
    m.set_epoch(50)
    assert m.teacher_forcing == pytest.approx(0.2)
    assert tiny(teacher_forcing=1.0, teacher_forcing_epochs=0).teacher_forcing == 0.0


def test_independent_ablation_has_no_coarse_to_fine_path():
    m = tiny(conditioning="independent", teacher_forcing=1.0).train()
    x = frames()
    t = targets_for(m)
    a = m(x, targets=t)
    b = m(x, targets=[tt + 1 for tt in t])
    assert all(u.equal(v) for u, v in zip(a, b))


@pytest.mark.parametrize("detach", [True, False])
def test_detached_condition_keeps_fine_loss_out_of_coarse_heads(detach):
    m = tiny(detach_condition=detach, teacher_forcing=0.0).train()
    outs = m(frames())
    outs[1].sum().backward()
    grad = m.heads[0].weight.grad
    if detach:
        assert grad is None or grad.abs().max() == 0
    else:
        assert grad is not None and grad.abs().max() > 0


def test_targets_of_the_wrong_shape_name_the_scale():
    m = tiny(teacher_forcing=1.0).train()
    t = targets_for(m)
    t[1] = t[1][..., :-1]
    with pytest.raises(ShapeError, match="scale 1"):
        m(frames(), targets=t)


# -------------------------------------------------------------------------- stable start
def test_initial_p_matches_expected_density_per_scale():
    p_init = 0.01
    m = tiny(p_init=p_init).train()
    with torch.no_grad():
        outs = m(frames(n=4))
    lam = -math.log1p(-p_init)
    for o, f in zip(outs, FACTORS):
        expected = 1 - math.exp(-lam * (2.0 / f) ** 2)
        assert torch.sigmoid(o[:, 0]).mean().item() == pytest.approx(expected, rel=0.3)
        assert o[:, 1:].abs().max() < 1.0  # small heads: other channels start near 0


def test_parameters_and_first_step_are_finite():
    m = tiny().train()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    loss = sum(o.square().mean() for o in m(frames(), targets=targets_for(m)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


# ---------------------------------------------------------------------- autocast, sizes
def test_bfloat16_autocast_on_cpu():
    m = tiny(teacher_forcing=0.5, seed=0).train()
    x, t = frames(), targets_for(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = m(x, targets=t)
        loss = sum(o.square().mean() for o in outs)
    loss.backward()
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    with torch.no_grad():
        y32 = m(x)
    assert y16.dtype == torch.float32
    torch.testing.assert_close(y16, y32, atol=0.05, rtol=0.05)


def test_odd_frame_size_is_padded_and_cropped():
    m = tiny().eval()
    with torch.no_grad():
        y = m(frames(size=16)[..., :13, :15].contiguous())
    assert y.shape == (2, 6, 26, 30)
    m.train()
    # coarse grids of 13 px are not whole: training needs a frame that fits every scale
    with pytest.raises(ShapeError, match="multiples of 4 px"):
        m(frames(size=16)[..., :13, :15])


def test_frame_the_finest_scale_cannot_fit_names_the_working_sizes():
    m = tiny(factors=[0.25, 0.5]).eval()
    with pytest.raises(ShapeError, match="multiples of 2 px"):
        m(frames(size=16)[..., :15, :16])


def test_other_frame_size_with_same_weights():
    """A model trained on 16 px frames fits 24 px frames: padding-free sizes, windows rebuilt."""
    m = tiny().eval()
    with torch.no_grad():
        y = m(frames(size=24))
    assert y.shape == (2, 6, 48, 48) and torch.isfinite(y).all()


# ------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip():
    m = tiny().eval()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    m2 = VARMultiScale(3, ScaleSchedule((16, 16), FACTORS), **TINY).eval()
    x = frames()
    with torch.no_grad():
        assert not m2(x).equal(m(x))
        m2.load_state_dict(torch.load(buf))  # weights_only loading (torch's default) suffices
        assert m2(x).equal(m(x))


def test_checkpoint_of_another_schedule_is_refused_with_the_reason():
    sd = tiny().state_dict()
    other = VARMultiScale(3, ScaleSchedule((16, 16), [0.25, 0.5, 1.0, 4.0]), **TINY)
    with pytest.raises(CheckpointError, match="factors"):
        other.load_state_dict(sd)


def test_models_are_reproducible_from_the_seed():
    a, b = tiny(), tiny()
    assert all(p.equal(q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------- parse
def make_param(**model):
    """A loaded param (defaults filled and checked, as load_param gives it) with a small network."""
    from decode_var.config.param import param_from_dict

    return param_from_dict({
        "HyperParameter": {"channels_in": 3},
        "Simulation": {"img_size": [16, 16], "psf_extent": [[-0.5, 15.5], [-0.5, 15.5], None], "emitter_av": 5.0,
                       "emitter_extent": [[-0.5, 15.5], [-0.5, 15.5], [-750.0, 750.0]]},
        "VAR": {"scales": [0.25, 0.5, 1.0], "seed": 0,
                "model": {**dict(features=4, token_dim=8, depth=1, heads=2), **model},
                "teacher_forcing": {"start": 0.8, "end": 0.1, "epochs": 4}}})


def test_parse_reads_hyperparameter_and_var_sections():
    m = VARMultiScale.parse(make_param(window=3, conditioning="independent"))
    assert m.channels_in == 3 and m.schedule.factors == (0.25, 0.5, 1.0)
    assert m.window == 3 and m.conditioning == "independent"
    assert m.encoder.widths == [4, 8, 16]
    assert m.teacher_forcing == pytest.approx(0.8) and m.teacher_forcing_at(4) == pytest.approx(0.1)
    # p_init from Simulation.emitter_av over the finest grid: 5 emitters on 16 x 16 cells
    expected = 1 - math.exp(-5 / 256)
    assert torch.sigmoid(m.heads[-1].bias[0]).item() == pytest.approx(expected, rel=1e-5)
    assert registry.get_model("VARMultiScale") is VARMultiScale


def test_parse_takes_initial_features_from_arch_param():
    p = make_param()
    p.HyperParameter.arch_param.initial_features = 6
    assert VARMultiScale.parse(p).encoder.widths == [6, 12, 24]


def test_parse_with_the_packaged_reference_defaults():
    from decode_var.config.param import param_from_dict

    m = VARMultiScale.parse(param_from_dict({}))
    assert m.conditioning == "next_scale" and m.schedule.factors == (0.25, 0.5, 1.0)
    assert m.n_token_scales == 1  # a 10 x 10 token grid; 20 x 20 and 40 x 40 refined by convolutions
    assert sum(p.numel() for p in m.parameters()) <= 2.2e6  # the parameter budget


@pytest.mark.parametrize("key,value", [
    ("conditioning", "parallel"), ("heads", 3), ("window", 0), ("p_init", 1.5), ("depth", 1.5),
    ("token_max_factor", -1.0), ("detach_condition", "yes"),
])
def test_parse_rejects_invalid_values_naming_the_key(key, value):
    """The param's one validation names the key, before the model is built."""
    with pytest.raises(ParamError, match=f"VAR.model.{key}"):
        make_param(**{key: value})


# ------------------------------------------------------------------------------ re-centring
@settings(max_examples=40, deadline=None)
@given(hc=st.integers(1, 6), ratio=st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.0]), seed=st.integers(0, 10_000))
def test_recentred_offsets_point_to_the_same_position(hc, ratio, seed):
    """Upsampling must not move an emitter: centre + offset x cell size (input px) is the same on
    both grids, with offsets in cells of each grid."""
    hf = int(round(hc * ratio))
    assume(hf == hc * ratio)  # a whole number of fine cells; Hypothesis draws another example otherwise
    f_c, f_f = 0.25, 0.25 * ratio
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 6, hc, hc, generator=g)
    fine = recentre_upsample(coarse, (hf, hf), 1 / f_c, 1 / f_f)
    centre_c = (torch.arange(hc) + 0.5) / f_c
    centre_f = (torch.arange(hf) + 0.5) / f_f
    ix = ((torch.arange(hf) + 0.5) * hc / hf).floor().long()  # coarse cell holding each fine centre
    x_abs_coarse = centre_c[ix][:, None] + coarse[0, 2][ix][:, ix] / f_c
    y_abs_coarse = centre_c[ix][None, :] + coarse[0, 3][ix][:, ix] / f_c
    torch.testing.assert_close(centre_f[:, None] + fine[0, 2] / f_f, x_abs_coarse, atol=1e-5, rtol=0)
    torch.testing.assert_close(centre_f[None, :] + fine[0, 3] / f_f, y_abs_coarse, atol=1e-5, rtol=0)
    assert fine[:, [0, 1, 4, 5]].equal(coarse[:, [0, 1, 4, 5]][:, :, ix][:, :, :, ix])


def _isolated_emitters(shape, n, seed):
    """Emitters (px) in one frame, and which are isolated: no other emitter within 3 coarsest cells
    (0.25 grid: 12 px) along both axes, so no ROI of any scale overwrites their central cell."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor(shape, dtype=torch.float64) - 0.5
    xy = xy.float()
    d = (xy[:, None] - xy[None]).abs()
    near = ((d[..., 0] < 12) & (d[..., 1] < 12)).sum(1) > 1
    return xy, ~near


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from([(24, 40), (40, 24), (32, 32), (16, 48)]), n=st.integers(1, 8),
       seed=st.integers(0, 10_000))
def test_teacher_forced_condition_equals_the_finer_target(shape, n, seed):
    """Ground-truth targets of scale k-1 (network units: cells of scale k-1) through the model's own
    conditioning path become, on every fine cell holding an isolated emitter, scale k's own target
    offset (cells of scale k). Grids 0.25, 0.5, 1, 2; non-square frames."""
    from decode_var.backend import get_backend
    from decode_var.core.emitters import EmitterSet
    from decode_var.data.targets import MultiScaleTargets, TargetRescale

    sched = ScaleSchedule(shape, FACTORS)
    xy, isolated = _isolated_emitters(shape, n, seed)
    em = EmitterSet(xyz=torch.cat([xy, torch.zeros(n, 1)], 1), phot=torch.full((n,), 5000.0),
                    frame_ix=torch.zeros(n, dtype=torch.long), xy_unit="px")
    tg = MultiScaleTargets(sched, get_backend("builtin"), roi_size=3,
                           rescale=TargetRescale(phot_max=10_000.0, z_max=750.0, bg_max=100.0))
    targets, _ = tg(em, torch.full((1, *shape), 50.0), 1)
    torch.manual_seed(0)
    model = VARMultiScale(3, sched, **TINY).train()
    model.teacher_forcing = 1.0
    seen = {}  # the map each scale k >= 1 is conditioned on, as its layers receive it
    for k, conv in enumerate(model.token_cond, start=1):
        conv.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0]))
    for j, stage in enumerate(model.refine):  # a refine stage gets recentre's two terms
        k = model.n_token_scales + j
        stage.register_forward_pre_hook(
            lambda mod, args, k=k: seen.__setitem__(k, upsample_cells(args[3], args[1]) + args[4]))
    model(torch.zeros(1, 3, *shape), targets=targets)
    assert sorted(seen) == [1, 2, 3]
    for k in range(1, len(sched)):
        scale = sched[k]
        cond = seen[k][..., :scale.img_shape[0], :scale.img_shape[1]]
        cell = torch.tensor(scale.cell_size)
        ij = ((xy + 0.5) / cell).floor().long()[isolated]
        got = cond[0, 2:4][:, ij[:, 0], ij[:, 1]]
        want = targets[k][0, 2:4][:, ij[:, 0], ij[:, 1]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # and, back in px, the fine cell points at the emitter
        centre = (ij.float() + 0.5) * cell - 0.5
        torch.testing.assert_close(centre + got.t() * cell, xy[isolated], atol=1e-4, rtol=0)


@pytest.mark.parametrize("f_c,f_f,shape", [(0.5, 1.0, (8, 12)), (1.0, 2.0, (12, 8)), (0.25, 0.5, (4, 8))])
def test_refine_stage_projects_on_the_coarse_grid_exactly(f_c, f_f, shape):
    """RefineStage's coarse-grid projections equal projecting the upsampled, re-centred inputs."""
    torch.manual_seed(0)
    stage = RefineStage(5, 7, 6, True, torch.nn.ELU)
    H, W = int(shape[0] * f_f / f_c), int(shape[1] * f_f / f_c)
    feat = torch.randn(2, 5, *shape if f_f > 1 else (H, W))
    prev = torch.randn(2, 7, *shape)
    map_c = torch.randn(2, 6, *shape)
    coarse, shift = recentre(map_c, (H, W), 1 / f_c, 1 / f_f)
    fast = stage(feat, (H, W), prev, coarse, shift)
    slow_in = (stage.from_feat(resample(feat, (H, W))) + resample(stage.from_prev(prev), (H, W))
               + stage.from_map(recentre_upsample(map_c, (H, W), 1 / f_c, 1 / f_f)))
    torch.testing.assert_close(fast, stage.body(slow_in), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- with DECODE
@pytest.mark.decode
def test_decode_post_processing_infer_and_load_save(tmp_path):
    from decode.neuralfitter.coord_transform import Offset2Coordinate
    from decode.neuralfitter.inference.inference import Infer
    from decode.neuralfitter.post_processing import SpatialIntegration
    from decode.neuralfitter.utils.processing import TransformSequence
    from decode.utils.model_io import LoadSaveModel

    schedule = ScaleSchedule((16, 16), [0.25, 0.5, 1.0])
    torch.manual_seed(0)
    m = VARMultiScale(3, schedule, **TINY, p_init=0.3)
    finest = schedule.finest
    post = TransformSequence([
        Offset2Coordinate(finest.xextent, finest.yextent, finest.img_shape),
        SpatialIntegration(raw_th=0.2, xy_unit="px", pphotxyzbg_mapping=(0, 1, 2, 3, 4, 5),
                           photxyz_sigma_mapping=None),
    ])
    stack = torch.randn(6, 16, 16, generator=torch.Generator().manual_seed(3))

    em = Infer(m, ch_in=3, frame_proc=None, post_proc=post, device="cpu", batch_size=4).forward(stack)
    assert len(em) > 0
    assert em.frame_ix.min() >= 0 and em.frame_ix.max() <= 5
    assert (em.xyz[:, :2] > -1.5).all() and (em.xyz[:, :2] < 16.5).all()
    assert em.prob.min() >= 0.2 and em.prob.max() <= 1.0

    saver = LoadSaveModel(m, output_file=tmp_path / "model.pt")
    saver.save(m, None)
    saved = next(tmp_path.glob("model_*.pt"))
    torch.manual_seed(99)
    fresh = VARMultiScale(3, schedule, **TINY, p_init=0.3)
    loaded = LoadSaveModel(fresh, output_file=None, input_file=saved).load_init(device="cpu")
    assert not loaded.training
    em2 = Infer(loaded, ch_in=3, frame_proc=None, post_proc=post, device="cpu", batch_size=4).forward(stack)
    assert len(em2) == len(em)
    torch.testing.assert_close(em2.xyz, em.xyz)


def test_a_checkpoint_of_an_earlier_model_format_is_refused_with_the_fix():
    from decode_var.core.errors import CheckpointError
    from decode_var.nn.model import VARMultiScale
    from decode_var.core.scales import ScaleSchedule

    model = VARMultiScale(3, ScaleSchedule((16, 16), [0.25, 0.5, 1.0]), features=8, token_dim=16, depth=1, heads=2)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    state[key] = {**state[key], "format": 1}
    with pytest.raises(CheckpointError, match="earlier decode-var.*Retrain"):
        model.load_state_dict(state)
