"""The 6-channel loss: terms, DECODE equivalence, multi-scale weighting, schedules, stability, parse, state."""
import io
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decode_var.nn.channel_weights import CHANNELS, PRESETS
from decode_var.core.errors import CheckpointError, ParamError, ShapeError
from decode_var import registry
from decode_var.nn.loss import AdaptivePPXYZBLoss, PPXYZBLoss
from decode_var.nn.progressive import (ConstantScaleWeights, VARProgressiveSchedule, WarmupScaleWeights,
                                    build_schedule)


def _batch(n=2, h=5, w=4, seed=0, dtype=torch.float32):
    """Random raw output, 0/1-p target and a SimpleWeight-like 0/1 weight map, all (N, 6, H, W)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 6, h, w, generator=g, dtype=dtype) * 3
    tar = torch.rand(n, 6, h, w, generator=g, dtype=dtype)
    tar[:, 0] = (tar[:, 0] > 0.8).to(dtype)
    wgt = (torch.rand(n, 6, h, w, generator=g) > 0.3).to(dtype)
    wgt[:, [0, 5]] = 1
    return out, tar, wgt


def _reference(out, tar, wgt, pos_weight, chw, xyz="mse", beta=0.1):
    """The documented per-element formula, written out independently in float64."""
    out, tar, wgt = out.double(), tar.double(), wgt.double()
    x, t = out[:, 0], tar[:, 0]
    p = pos_weight * t * torch.logaddexp(torch.zeros_like(x), -x) + (1 - t) * torch.logaddexp(torch.zeros_like(x), x)
    d = out[:, 1:] - tar[:, 1:]
    rest = d ** 2
    if xyz == "smooth_l1":
        a = d[:, 1:4].abs()
        rest[:, 1:4] = torch.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta) if beta > 0 else a
    loss = torch.cat((p.unsqueeze(1), rest), 1)
    return loss * wgt * torch.tensor(chw, dtype=torch.float64).view(1, 6, 1, 1)


# ---------------------------------------------------------------------- terms
@pytest.mark.parametrize("xyz, beta", [("mse", 0.1), ("smooth_l1", 0.1), ("smooth_l1", 0.0), ("smooth_l1", 2.0)])
@pytest.mark.parametrize("chw", ["balanced", "recommended", [0.5, 2, 0, 1, 3, 0.1]])
def test_elementwise_loss_is_the_documented_formula(xyz, beta, chw):
    out, tar, wgt = _batch(dtype=torch.float64)
    crit = PPXYZBLoss(pos_weight=2.0, xyz_loss=xyz, smooth_l1_beta=beta, channel_weights=chw)
    weights = PRESETS[chw] if isinstance(chw, str) else chw
    loss = crit(out, tar, wgt)
    assert loss.shape == out.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss, _reference(out, tar, wgt, 2.0, weights, xyz, beta), rtol=1e-12, atol=1e-12)


def test_detection_term_has_no_sigmoid_then_log():
    # sigmoid(1e4) is exactly 1.0 in float32, so log(1 - sigmoid) would be -inf; BCE with logits is exact
    crit = PPXYZBLoss(pos_weight=2.0, channel_weights="balanced")
    out = torch.zeros(1, 6, 1, 2)
    out[0, 0, 0] = torch.tensor([1e4, -1e4])
    tar = torch.zeros(1, 6, 1, 2)
    tar[0, 0, 0, 1] = 1
    out.requires_grad_(True)
    loss = crit(out, tar, torch.ones_like(out))
    assert loss[0, 0, 0].tolist() == [1e4, 2e4]
    loss.sum().backward()
    assert out.grad[0, 0, 0].tolist() == [1.0, -2.0]


def test_log_matches_decode_convention():
    out, tar, wgt = _batch()
    crit = PPXYZBLoss(channel_weights="recommended")
    loss = crit(out, tar, wgt)
    total, comp = crit.log(loss)
    per_channel = loss.mean((0, 2, 3))
    assert total == pytest.approx(loss.mean().item(), rel=1e-6)
    for c, ch in enumerate(CHANNELS):
        assert comp[ch] == pytest.approx(per_channel[c].item(), rel=1e-6)
    assert comp["s0"] == pytest.approx(total, rel=1e-6)


def test_autocast_and_half_inputs_compute_in_float32():
    out, tar, wgt = _batch()
    crit = PPXYZBLoss()
    ref = crit(out, tar, wgt)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            got = crit(out.to(dtype), tar, wgt)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, crit(out.to(dtype).float(), tar, wgt))
    assert torch.isfinite(ref).all()


def test_half_output_gradient_saturates_instead_of_overflowing():
    # d/d out of sum((out - 1e6)^2) is -2e6, beyond float16; it must come back as -65504, not -inf
    crit = PPXYZBLoss(channel_weights="balanced")
    out = torch.zeros(1, 6, 1, 1, dtype=torch.float16, requires_grad=True)
    tar = torch.zeros(1, 6, 1, 1)
    tar[0, 1] = 1e6
    crit(out, tar, torch.ones(1, 6, 1, 1)).sum().backward()
    assert out.grad.dtype == torch.float16
    assert out.grad[0, 1].item() == -65504.0


@pytest.mark.parametrize("bad", [
    lambda o, t, w: (o[:, :5], t[:, :5], w[:, :5]),
    lambda o, t, w: (o, t[:1], w),
    lambda o, t, w: (o[0], t[0], w[0]),
    lambda o, t, w: ("x", t, w),
    lambda o, t, w: ([o, o], [t], [w, w]),
])
def test_bad_shapes_raise_shape_error(bad):
    out, tar, wgt = _batch()
    with pytest.raises(ShapeError):
        PPXYZBLoss(n_scales=2, scale_schedule="none")(*bad(out, tar, wgt))


# ---------------------------------------------------------------------- multi-scale
def _scales(sizes=((2, 2), (4, 4), (8, 6)), n=2, seed=1):
    outs, tars, wgts = [], [], []
    for k, (h, w) in enumerate(sizes):
        o, t, wt = _batch(n, h, w, seed=seed + k)
        outs.append(o), tars.append(t), wgts.append(wt)
    return outs, tars, wgts


def test_multiscale_mean_is_weighted_sum_of_per_scale_means():
    outs, tars, wgts = _scales()
    crit = PPXYZBLoss(n_scales=3, scale_schedule="warmup", warmup_epochs=20, scale_balance="mean")
    crit.set_epoch(5)
    w = crit.scale_weights
    assert len(set(w)) == 3  # distinct, so a wrong pairing of weight and scale would show
    loss = crit(outs, tars, wgts)
    assert loss.shape == (2, 6, 4 + 16 + 48)
    expected = sum(w_k * crit.elementwise(o, t, wt).mean() for w_k, o, t, wt in zip(w, outs, tars, wgts))
    torch.testing.assert_close(loss.mean(), expected)

    total, comp = crit.log(loss)
    assert total == pytest.approx(expected.item(), rel=1e-5)
    assert sum(comp[f"s{k}"] for k in range(3)) == pytest.approx(total, rel=1e-5)
    for k in range(3):
        per_scale = w[k] * crit.elementwise(outs[k], tars[k], wgts[k]).mean((0, 2, 3))
        for c, ch in enumerate(CHANNELS):
            assert comp[f"s{k}_{ch}"] == pytest.approx(per_scale[c].item(), rel=1e-5, abs=1e-9)
    for ch in CHANNELS:
        assert comp[ch] == pytest.approx(sum(comp[f"s{k}_{ch}"] for k in range(3)), rel=1e-5, abs=1e-9)
    assert [s.name for s in loss.scale_slices] == ["s0_2x2", "s1_4x4", "s2_8x6"]


def test_log_survives_concatenation_along_the_batch_as_in_decode_test_loop():
    outs, tars, wgts = _scales()
    crit = PPXYZBLoss(n_scales=3, scale_schedule="none")
    a = crit(outs, tars, wgts)
    b = crit(*_scales(seed=7))
    total, comp = crit.log(torch.cat((a, b), 0))
    assert total == pytest.approx(torch.cat((a, b), 0).mean().item(), rel=1e-6)
    assert "s2_bg" in comp


def _per_scale(comp: dict) -> dict:
    return {k: v for k, v in comp.items() if k.startswith("s")}


def test_log_describes_the_value_it_is_given_not_the_last_forward():
    """The layout travels with the loss: a second forward on other scales, or another loss instance,
    leaves the components of an earlier value as they were; a plain tensor borrows no layout."""
    outs, tars, wgts = _scales()
    crit = PPXYZBLoss(n_scales=3, scale_schedule="none")
    first = crit(outs, tars, wgts)
    expected = _per_scale(crit.log(first)[1])
    assert sorted(k for k in expected if "_" not in k) == ["s0", "s1", "s2"]
    crit(outs[:2], tars, wgts)  # the next forward computes two scales only
    assert _per_scale(crit.log(first)[1]) == expected
    assert _per_scale(PPXYZBLoss(n_scales=3, scale_schedule="none").log(first)[1]) == expected
    plain = first.detach().clone().as_subclass(torch.Tensor)
    crit(outs, tars, wgts)  # a forward of the same layout just before
    assert _per_scale(crit.log(plain)[1]) == {}


def test_the_layout_survives_what_keeps_the_positions():
    """DECODE's loops concatenate batches and multiply by a per-element weight (grad_rescale); a mean or a
    channel of the loss is a plain tensor."""
    crit = PPXYZBLoss(n_scales=3, scale_schedule="none")
    a, b = crit(*_scales()), crit(*_scales(seed=7))
    slices = a.scale_slices
    assert [(s.index, s.start, s.length) for s in slices] == [(0, 0, 4), (1, 4, 16), (2, 20, 48)]
    for kept in (torch.cat((a, b), 0), a * torch.rand_like(a), a.detach().cpu(), a.float(), a[:1], a[:0]):
        assert kept.scale_slices == slices
    for plain in (a.mean(), a[:, :1], a[..., :4], a.mean(0)):
        assert not hasattr(plain, "scale_slices")
    c = crit(*_scales(sizes=((2, 2), (4, 4), (6, 8))))  # same lengths, other names: no layout is chosen
    assert not hasattr(torch.cat((a, c), 0), "scale_slices")
    single = crit(*_batch())
    assert [(s.index, s.name, s.length) for s in single.scale_slices] == [(0, "s0_5x4", 20)]
    assert single.shape == (2, 6, 5, 4) and "s0_p" in crit.log(single)[1]


def test_inactive_scales_are_not_computed(monkeypatch):
    outs, tars, wgts = _scales()
    outs[1] = torch.full_like(outs[1], float("nan"))  # would poison the loss if it were touched
    outs[2] = torch.full_like(outs[2], float("nan"))
    crit = PPXYZBLoss(n_scales=3, scale_schedule="var", stage_epochs=10)
    crit.set_epoch(3)
    assert crit.scale_weights == [1, 0, 0] and crit.active_scales == 1
    calls = []
    original = crit.elementwise
    monkeypatch.setattr(crit, "elementwise", lambda *a: calls.append(a[0].shape) or original(*a))
    loss = crit(outs, tars, wgts)
    assert torch.isfinite(loss).all() and calls == [outs[0].shape] and loss.shape[-1] == 4
    # a model that computes only the active scales gives the same loss
    torch.testing.assert_close(crit(outs[:1], tars, wgts), loss)


def test_newly_added_scale_gets_a_small_gradient():
    outs, tars, wgts = _scales()
    outs = [o.requires_grad_(True) for o in outs]
    crit = PPXYZBLoss(n_scales=3, scale_schedule="var", stage_epochs=10, stage_warmup=5, scale_balance="mean")
    crit.set_epoch(10)  # scale 1 just added at 0.01
    crit(outs[:2], tars, wgts).mean().backward()
    ref = [o.detach().clone().requires_grad_(True) for o in outs[:2]]
    (crit.elementwise(ref[0], tars[0], wgts[0]).mean() + crit.elementwise(ref[1], tars[1], wgts[1]).mean()).backward()
    torch.testing.assert_close(outs[0].grad, ref[0].grad)
    torch.testing.assert_close(outs[1].grad, 0.01 * ref[1].grad)
    assert outs[2].grad is None


def test_no_active_scale_given_is_an_error():
    crit = PPXYZBLoss(n_scales=3, scale_schedule="none")
    with pytest.raises(ShapeError):
        crit([], [], [])


# ---------------------------------------------------------------------- schedules
@pytest.mark.parametrize("epoch, weights", [
    (0, [1, 0, 0, 0]), (9.99, [1, 0, 0, 0]), (10, [1, 0.01, 0, 0]), (12, [1, 0.4, 0, 0]), (15, [1, 1, 0, 0]),
    (20, [1, 1, 0.01, 0]), (30, [1, 1, 1, 0.01]), (33, [1, 1, 1, 0.6]), (1000, [1, 1, 1, 1]),
])
def test_var_schedule_weights(epoch, weights):
    sched = VARProgressiveSchedule(4, start_scales=1, stage_epochs=10, stage_warmup=5)
    assert sched.weights(epoch) == pytest.approx(weights)
    assert sched.n_active(epoch) == sum(w > 0 for w in weights)


def test_var_schedule_start_scales_are_not_ramped_and_zero_warmup_adds_at_full_weight():
    sched = VARProgressiveSchedule(4, start_scales=2, stage_epochs=10, stage_warmup=5)
    assert sched.weights(0) == [1, 1, 0, 0] and sched.weights(10) == pytest.approx([1, 1, 0.01, 0])
    assert sched.weights(20) == pytest.approx([1, 1, 1, 0.01])
    assert VARProgressiveSchedule(3, stage_epochs=4, stage_warmup=0).weights(4) == [1, 1, 0]


@pytest.mark.parametrize("epoch, base", [(0, 0.1), (10, 0.55), (20, 1.0), (50, 1.0)])
def test_warmup_schedule_weights(epoch, base):
    sched = WarmupScaleWeights(4, warmup_epochs=20)
    assert sched.weights(epoch) == pytest.approx([base ** 3, base ** 2, base, 1.0])
    assert sched.n_active(epoch) == 4
    assert WarmupScaleWeights(3, warmup_epochs=0).weights(0) == [1, 1, 1]


def test_loss_set_epoch_follows_the_schedule():
    crit = PPXYZBLoss(n_scales=4, scale_schedule="warmup", warmup_epochs=20)
    assert crit.scale_weights == pytest.approx([1e-3, 1e-2, 0.1, 1])  # at construction: epoch 0
    assert crit.set_epoch(10) == pytest.approx([0.55 ** 3, 0.55 ** 2, 0.55, 1])
    assert ConstantScaleWeights(3).weights(7) == [1, 1, 1]
    crit = PPXYZBLoss(n_scales=4, scale_schedule="var", stage_epochs=10)
    crit.set_epoch(21.5)
    assert crit.active_scales == 3 == crit.schedule.n_active(21.5)


@pytest.mark.parametrize("kwargs, key", [
    ({"scale_schedule": "cosine"}, "scale_schedule"), ({"start_scales": 5}, "start_scales"),
    ({"stage_epochs": 0}, "stage_epochs"), ({"stage_warmup": -1}, "stage_warmup"),
    ({"scale_schedule": "warmup", "warmup_epochs": float("nan")}, "warmup_epochs"),
])
def test_bad_schedule_settings_name_the_key(kwargs, key):
    with pytest.raises(ParamError, match=f"VAR.loss.{key}"):
        PPXYZBLoss(n_scales=4, **kwargs)


def test_negative_epoch_is_rejected():
    with pytest.raises(ValueError):
        build_schedule("var", 3).weights(-1)


# ---------------------------------------------------------------------- stability (hypothesis)
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5),
       logit_mag=st.sampled_from([0.0, 1.0, 30.0, 1e3, 1e4]), phot_mag=st.sampled_from([0.0, 1.0, 1e3, 1e6]),
       out_mag=st.sampled_from([1.0, 1e2, 1e4]), out_dtype=st.sampled_from(list(_DTYPES)),
       autocast=st.sampled_from([None, "f16", "bf16"]), empty=st.booleans(), zero_weight=st.booleans(),
       xyz=st.sampled_from(["mse", "smooth_l1"]), adaptive=st.booleans())
def test_loss_and_gradients_stay_finite(seed, n, h, w, logit_mag, phot_mag, out_mag, out_dtype, autocast, empty,
                                        zero_weight, xyz, adaptive):
    g = torch.Generator().manual_seed(seed)
    out = (torch.rand(n, 6, h, w, generator=g) * 2 - 1) * out_mag
    out[:, 0] = (torch.rand(n, h, w, generator=g) * 2 - 1) * logit_mag
    out[0, 0, 0, 0] = logit_mag  # the extremes themselves, not only values near them
    out[-1, 0, -1, -1] = -logit_mag
    tar = torch.rand(n, 6, h, w, generator=g)
    tar[:, 0] = (tar[:, 0] > 0.5).float()
    tar[:, 1] *= phot_mag
    if empty:
        tar.zero_()
    wgt = torch.zeros(n, 6, h, w) if zero_weight else (torch.rand(n, 6, h, w, generator=g) > 0.5).float()
    # two scales of the same size, separate leaves (as two heads of a model)
    outs = [out.to(_DTYPES[out_dtype]).requires_grad_(True) for _ in range(2)]

    cls = AdaptivePPXYZBLoss if adaptive else PPXYZBLoss
    crit = cls(xyz_loss=xyz, n_scales=2, scale_schedule="warmup")
    if autocast:
        with torch.autocast("cpu", dtype=_DTYPES[autocast]):
            loss = crit(outs, [tar, tar], [wgt, wgt])
    else:
        loss = crit(outs, [tar, tar], [wgt, wgt])
    assert torch.isfinite(loss).all()
    assert math.isfinite(crit.log(loss)[0])
    loss.mean().backward()
    assert all(torch.isfinite(o.grad).all() for o in outs)
    if zero_weight:
        assert loss.abs().sum() == 0 and all(o.grad.abs().sum() == 0 for o in outs)
    assert crit.nonfinite_report(outs, [tar, tar], [wgt, wgt]) == []


# ---------------------------------------------------------------------- diagnostics
def test_nonfinite_report_names_scale_channel_and_tensor():
    outs, tars, wgts = _scales(sizes=((2, 2), (4, 4), (8, 8)))
    outs[2][0, 2, 1, 1] = float("nan")
    outs[2][1, 2, 0, 0] = float("inf")
    tars[0][0, 1, 0, 0] = float("inf")
    crit = PPXYZBLoss(n_scales=3, scale_schedule="none")
    assert not torch.isfinite(crit(outs, tars, wgts)).all()
    report = crit.nonfinite_report(outs, tars, wgts)
    assert "scale 2 (s2_8x8) channel x: 2 non-finite elements in output" in report
    assert "scale 2 (s2_8x8) channel x: 2 non-finite elements in loss" in report
    assert "scale 0 (s0_2x2) channel phot: 1 non-finite elements in target" in report
    assert "scale 0 (s0_2x2) channel phot: 1 non-finite elements in loss" in report
    assert len(report) == 4
    assert crit.nonfinite_report(*_scales()) == []


# ---------------------------------------------------------------------- parse
def _param(loss=None, scales=(0.5, 1.0), **hyper):
    return SimpleNamespace(VAR=SimpleNamespace(loss=loss, scales=list(scales)),
                           HyperParameter=SimpleNamespace(**hyper))


def test_parse_defaults_from_partial_namespaces():
    # an empty namespace is a param that sets nothing: the reference defaults, VAR.scales included (as load_param)
    crit = AdaptivePPXYZBLoss.parse(SimpleNamespace())
    assert crit.n_scales == 3 and crit.factors == [0.25, 0.5, 1.0]
    assert crit.pos_weight == 2.0 and crit.xyz_loss == "mse"
    assert crit.channel_weights.tolist() == pytest.approx(PRESETS["recommended"])
    assert crit.adaptive.interval == 10 and crit.adaptive.window == 5 and crit.adaptive.enabled
    crit = PPXYZBLoss.parse(_param(loss=None, scales=(0.25, 0.5, 1.0, 2.0)))
    assert crit.n_scales == 4 and crit.schedule.name == "warmup"


def test_parse_reads_every_key():
    section = SimpleNamespace(pos_weight=3.0, xyz_loss="smooth_l1", smooth_l1_beta=0.2,
                              channel_weights="localization_focused", adaptive=False, adaptive_interval=4,
                              adaptive_window=2, adaptive_up_ratio=0.9, adaptive_down_ratio=0.7, adaptive_up=1.2,
                              adaptive_down=0.8, weight_min=0.2, weight_max=5.0, renormalise=False,
                              scale_schedule="warmup", warmup_epochs=7, start_scales=2, stage_epochs=3,
                              stage_warmup=1)
    crit = AdaptivePPXYZBLoss.parse(_param(section, scales=(0.5, 1.0, 2.0)))
    assert (crit.pos_weight, crit.xyz_loss, crit.smooth_l1_beta) == (3.0, "smooth_l1", 0.2)
    assert crit.adaptive.config() == {"interval": 4, "window": 2, "up_ratio": 0.9, "down_ratio": 0.7, "up": 1.2,
                                      "down": 0.8, "weight_min": 0.2, "weight_max": 5.0, "renormalise": False,
                                      "enabled": False}
    assert crit.schedule.config() == {"name": "warmup", "n_scales": 3, "warmup_epochs": 7.0}
    assert crit.channel_weights.tolist() == list(PRESETS["localization_focused"])
    crit = PPXYZBLoss.parse(_param({"scale_schedule": "var", "start_scales": 2, "stage_epochs": 3,
                                    "stage_warmup": 1, "channel_weights": [1, 2, 3, 4, 5, 6]}))
    assert crit.schedule.config() == {"name": "var", "n_scales": 2, "start_scales": 2, "stage_epochs": 3.0,
                                      "stage_warmup": 1.0}
    assert crit.channel_weights.tolist() == [1, 2, 3, 4, 5, 6]


def test_parse_falls_back_to_decode_chweight_stat_of_six():
    assert PPXYZBLoss.parse(_param(chweight_stat=[1, 1, 1, 1, 1, 0])).channel_weights.tolist() == [1, 1, 1, 1, 1, 0]
    # DECODE's reference param has 2 values (for its mixture-model loss): not ours, preset stays
    assert PPXYZBLoss.parse(_param(chweight_stat=[1.0, 1.0])).channel_weights.tolist() == pytest.approx(
        PRESETS["recommended"])


@pytest.mark.parametrize("key, value", [
    ("pos_weight", 0), ("pos_weight", "2"), ("xyz_loss", "l1"), ("smooth_l1_beta", -0.1),
    ("channel_weights", "bogus"), ("adaptive_interval", 0), ("adaptive_up", 0.5), ("weight_max", -1),
    ("scale_schedule", "linear"), ("start_scales", 3), ("renormalise", 1),
])
def test_parse_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ParamError, match=f"VAR.loss.{key}"):
        AdaptivePPXYZBLoss.parse(_param({key: value}))


def test_static_loss_refuses_adaptive_flag():
    with pytest.raises(ParamError, match="AdaptivePPXYZB"):
        PPXYZBLoss.parse(_param({"adaptive": True}))


def test_registry_names():
    assert registry.losses(registry.PACKAGE) == {"AdaptivePPXYZB": AdaptivePPXYZBLoss, "PPXYZB": PPXYZBLoss}
    assert issubclass(AdaptivePPXYZBLoss, PPXYZBLoss)
    # the checkpoint state names a loss by its one registered name
    assert AdaptivePPXYZBLoss().state_dict()["loss"] == "AdaptivePPXYZB"
    assert PPXYZBLoss().state_dict()["loss"] == "PPXYZB"


# ---------------------------------------------------------------------- adaptive loss and state
def _train_epochs(crit, first, last, outs, tars, wgts):
    """Epochs of a fake run: the loss values shrink at per-channel rates, so the rule has work to do."""
    rates = torch.tensor([1.0, 0.6, 0.95, 0.97, 0.8, 0.99]).view(1, 6, 1, 1)
    reports = []
    for e in range(first, last):
        crit.set_epoch(e)
        scaled = [o * rates ** e for o in outs]
        _, comp = crit.log(crit(scaled[:crit.active_scales], tars, wgts))
        reports.append(crit.update_epoch(comp))
    return reports


def test_adaptive_loss_divides_out_its_weights_before_the_rule():
    crit = AdaptivePPXYZBLoss(channel_weights="recommended", adaptive_interval=2, adaptive_window=1,
                              renormalise=False)
    crit.update_epoch({ch: 2.0 * w for ch, w in zip(CHANNELS, PRESETS["recommended"])})
    crit.update_epoch({ch: 2.0 * w for ch, w in zip(CHANNELS, PRESETS["recommended"])})
    assert crit.adaptive.history[0] == [2.0, 2.0]
    assert crit.channel_weights.tolist() == pytest.approx([w * 1.1 for w in PRESETS["recommended"]])


def test_static_loss_reports_but_keeps_weights():
    crit = PPXYZBLoss(channel_weights="detection_focused")
    report = crit.update_epoch([1, 2, 3, 4, 5, 6])
    assert report == {f"chw_{ch}": w for ch, w in zip(CHANNELS, PRESETS["detection_focused"])}


def test_adaptive_state_round_trip_resumes_exactly():
    outs, tars, wgts = _scales(sizes=((2, 2), (4, 4)))
    kwargs = dict(n_scales=2, scale_schedule="var", stage_epochs=8, stage_warmup=3,
                  adaptive_interval=4, adaptive_window=2)
    straight = AdaptivePPXYZBLoss(**kwargs)
    ref_reports = _train_epochs(straight, 0, 30, outs, tars, wgts)

    first = AdaptivePPXYZBLoss(**kwargs)
    _train_epochs(first, 0, 13, outs, tars, wgts)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = AdaptivePPXYZBLoss(**kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.scale_weights == first.scale_weights and resumed.epoch == 12
    reports = _train_epochs(resumed, 13, 30, outs, tars, wgts)

    assert reports == ref_reports[13:]
    assert resumed.state_dict() == straight.state_dict()
    assert any(r["chw_changed"] for r in ref_reports)  # the rule really acted during the run


def test_load_state_errors():
    crit = AdaptivePPXYZBLoss()
    with pytest.raises(CheckpointError):
        crit.load_state_dict({"weights": [1] * 6})
    with pytest.raises(CheckpointError, match="static"):
        crit.load_state_dict(PPXYZBLoss().state_dict())


# ---------------------------------------------------------------------- against real DECODE
def _decode_loss_module():
    return pytest.importorskip("decode.neuralfitter.loss", reason="DECODE 0.10 is not installed")


@pytest.mark.decode
@pytest.mark.parametrize("pos_weight", [1.0, 2.0])
@pytest.mark.parametrize("chw", [[1.0] * 6, [1.5, 1.0, 1.2, 1.2, 0.8, 0.8]])
def test_equals_decode_ppxyzb_elementwise(pos_weight, chw):
    decode_loss = _decode_loss_module()
    ref = decode_loss.PPXYZBLoss(device="cpu", chweight_stat=chw, p_fg_weight=pos_weight)
    ours = PPXYZBLoss(pos_weight=pos_weight, channel_weights=chw, xyz_loss="mse")
    for seed in range(5):
        out, tar, wgt = _batch(n=3, h=16, w=12, seed=seed)
        out[0, 0, 0, :3] = torch.tensor([1e4, -1e4, 0.0])
        expected, got = ref(out, tar, wgt), ours(out, tar, wgt)
        assert torch.equal(got, expected)
        total, comp = ours.log(got)
        ref_total, ref_comp = ref.log(expected)
        assert total == pytest.approx(ref_total, rel=1e-6)
        for ch in CHANNELS:
            assert comp[ch] == pytest.approx(ref_comp[ch], rel=1e-6, abs=1e-12)


@pytest.mark.decode
@pytest.mark.parametrize("multiscale", [False, True])
def test_runs_inside_decode_train_and_test_loops(multiscale):
    _decode_loss_module()
    train_val_impl = pytest.importorskip("decode.neuralfitter.train_val_impl")
    from decode.neuralfitter.utils import logger as logger_utils

    torch.manual_seed(0)

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if multiscale and self.training:
                return [torch.nn.functional.avg_pool2d(y, 2), y]
            return y

    def sample(i):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(1, 8, 8, generator=g)
        tar = torch.rand(6, 8, 8, generator=g)
        wgt = torch.ones(6, 8, 8)
        if multiscale:
            return x, [tar[:, ::2, ::2].contiguous(), tar], [wgt[:, ::2, ::2].contiguous(), wgt]
        return x, tar, wgt

    data = [sample(i) for i in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    crit = AdaptivePPXYZBLoss(n_scales=2, scale_schedule="none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mean = train_val_impl.train(model, opt, crit, loader, False, True, 0, "cpu", logger_utils.NoLog())
    assert math.isfinite(mean)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if not multiscale:
        test_loss, out = train_val_impl.test(model, crit, loader, 0, "cpu")
        assert torch.isfinite(test_loss) and out.loss.shape == (16, 6, 8, 8)
        total, comp = crit.log(out.loss)
        assert total == pytest.approx(test_loss.item(), rel=1e-6)


def test_super_resolved_scales_weight_positives_by_cells_per_px():
    """pos_weight x factor**2 on grids finer than 1x; DECODE's pos_weight on 1x and coarser."""
    loss = PPXYZBLoss(pos_weight=2.0, n_scales=4, factors=[0.25, 0.5, 1.0, 2.0], scale_schedule="none")
    out = [torch.zeros(1, 6, s, s) for s in (2, 4, 8, 16)]
    tar = [torch.zeros(1, 6, s, s) for s in (2, 4, 8, 16)]
    for t in tar:
        t[0, 0, 0, 0] = 1.0
    wgt = [torch.ones(1, 6, s, s) for s in (2, 4, 8, 16)]
    for k, pw in enumerate([2.0, 2.0, 2.0, 8.0]):
        got = loss.elementwise(out[k], tar[k], wgt[k], k)[0, 0]
        assert got[0, 0] == pytest.approx(pw * math.log(2.0) * loss.channel_weights[0].item(), rel=1e-6)
        assert got[0, 1] == pytest.approx(math.log(2.0) * loss.channel_weights[0].item(), rel=1e-6)


def test_scale_balance_cells_weighs_every_cell_alike():
    """'mean': the total is the sum of per-scale means; 'cells': the sum of per-scale sums over the
    finest grid's cell count (VAR's mean over all tokens, up to one constant)."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(2, 6, s, s, generator=g) for s in (2, 4, 8)]
    tar = [torch.rand(2, 6, s, s, generator=g) for s in (2, 4, 8)]
    wgt = [torch.ones(2, 6, s, s) for s in (2, 4, 8)]
    kw = dict(n_scales=3, scale_schedule="none", channel_weights=[1.0] * 6)
    per = [PPXYZBLoss(scale_balance="mean", **kw).elementwise(o, t, w, k) for k, (o, t, w) in enumerate(zip(out, tar, wgt))]
    mean = PPXYZBLoss(scale_balance="mean", **kw)(out, tar, wgt).mean()
    cells = PPXYZBLoss(scale_balance="cells", **kw)(out, tar, wgt).mean()
    assert mean.item() == pytest.approx(sum(p.mean().item() for p in per), rel=1e-5)
    assert cells.item() == pytest.approx(sum(p.sum().item() for p in per) / (2 * 6 * 64), rel=1e-5)
    with pytest.raises(ParamError, match="scale_balance"):
        PPXYZBLoss(scale_balance="tokens", **kw)
