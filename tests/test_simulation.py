import math

import pytest
import torch

from decode_var.core.errors import ParamError
from decode_var.config.param import param_from_dict
from decode_var.data.simulation import Camera, GaussianPSF, Simulator, astigmatism


def test_psf_integrates_to_photons_and_is_centred():
    psf = GaussianPSF((-0.5, 39.5), (-0.5, 39.5), (40, 40), sigma_0=1.2, mode_3d=False)
    f = psf.forward(torch.tensor([[20.0, 10.3, 0.0]]), torch.tensor([1000.0]), torch.tensor([0]), 1)
    assert abs(float(f.sum()) - 1000.0) < 1.0
    assert f[0].argmax() == 20 * 40 + 10
    com_y = float((f[0].sum(0) * torch.arange(40.0)).sum() / f.sum())
    assert abs(com_y - 10.3) < 1e-3


def test_astigmatism_like_decode():
    s = astigmatism(torch.tensor([-250.0, 0.0, 250.0]), 1.0, 250.0, 280.0)
    assert torch.allclose(s[0], torch.tensor([1.0, math.sqrt(1 + (500 / 280) ** 2)]))
    assert torch.allclose(s[1, 0], s[1, 1])


def test_camera_mean_and_photon_conversion():
    torch.manual_seed(0)
    cam = Camera(qe=0.9, spur_noise=0.002, em_gain=100.0, e_per_adu=45.0, baseline=100.0, read_sigma=74.4)
    x = torch.full((200, 64, 64), 50.0)
    out = cam.forward(x)
    # expected photons back (EM gain mean = gain; floor costs on average half an ADU)
    assert abs(float(out.mean()) * 0.9 - 50 * 0.9) < 1.0
    scmos = Camera(qe=1.0, spur_noise=0.0, em_gain=None, e_per_adu=1.0, baseline=0.0, read_sigma=0.0)
    v = scmos.forward(x).var()
    assert abs(float(v) - 50.0) < 2.5  # Poisson variance, no excess noise


def test_simulator_reproducible_and_dense_as_asked():
    p = param_from_dict({"Simulation": {"emitter_av": 10.0, "intensity_mu_sig": [5000.0, 0.0]},
                         "HyperParameter": {"emitter_label_photon_min": None}})
    sim = Simulator.parse(p)
    a, b, c = sim.sample(64, seed=5), sim.sample(64, seed=5), sim.sample(64, seed=6)
    assert torch.equal(a.frames_NCHW, b.frames_NCHW) and not torch.equal(a.frames_NCHW, c.frames_NCHW)
    assert a.frames_NCHW.shape == (64, 3, 40, 40)
    per_frame = len(a.em) / 64
    assert 7.0 < per_frame < 13.0, per_frame  # about emitter_av emitters on per frame
    assert torch.all(a.em.phot <= 5000.0 + 1e-3)  # a frame holds at most the full flux
    # the same blinking emitter keeps its position across the window
    same = a.em_all.id[:, None] == a.em_all.id[None, :]
    assert torch.equal((a.em_all.xyz[:, None] - a.em_all.xyz[None])[same].abs().sum(), torch.tensor(0.0))


def test_single_frame_window():
    p = param_from_dict({"HyperParameter": {"channels_in": 1}})
    batch = Simulator.parse(p).sample(4, seed=0)
    assert batch.frames_NCHW.shape == (4, 1, 40, 40)


def test_spline_without_decode_is_a_clear_error():
    p = param_from_dict({"VAR": {"psf": "spline"}, "InOut": {"calibration_file": "x.mat"}})
    with pytest.raises(ParamError, match="spline.*VAR.psf: gaussian"):
        Simulator.parse(p)


# --------------------------------------------------------------------------- background (issue 17)
from hypothesis import given, strategies as st  # noqa: E402

from decode_var.data.simulation import Background, perlin_NHW  # noqa: E402


def _ks_uniform(x: torch.Tensor, lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance between the samples ``x`` and U(lo, hi)."""
    x = torch.sort(x.double()).values
    n = x.numel()
    cdf = ((x - lo) / (hi - lo)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def test_background_is_drawn_per_frame_like_decode():
    # DECODE's UniformBackground draws one level per frame of the stack, so the frames of a window are
    # independent draws; the centre frame's background is the target's.
    p = param_from_dict({"Simulation": {"emitter_av": 0.0, "bg_uniform": [20.0, 200.0]}})
    batch = Simulator.parse(p).sample(2000, seed=1)
    bg_NCHW = batch.bg_NCHW
    assert bg_NCHW.shape == (2000, 3, 40, 40)
    assert torch.equal(batch.bg_NHW, bg_NCHW[:, 1])
    assert torch.equal(bg_NCHW.amax((2, 3)), bg_NCHW.amin((2, 3)))  # spatially constant
    level_NC = bg_NCHW[:, :, 0, 0]
    assert _ks_uniform(level_NC.flatten(), 20.0, 200.0) < 0.02  # 6000 draws: KS 1e-3 level is 0.025
    corr = torch.corrcoef(level_NC.T)
    assert corr.sub(torch.eye(3)).abs().max() < 0.1, corr  # independent across the window
    # and the frames carry it: without emitters a frame's mean photons is its own level
    mean_NC = batch.frames_NCHW.mean((2, 3))
    assert (mean_NC - level_NC).abs().max() < 15.0
    assert torch.corrcoef(torch.stack([mean_NC.flatten(), level_NC.flatten()]))[0, 1] > 0.99


def test_background_reproducible_through_seeded_path():
    p = param_from_dict({"Simulation": {"bg_perlin_amplitude": 50.0, "emitter_av": [1.0, 15.0]},
                         "VAR": {"bg_drift": 0.05}})
    sim = Simulator.parse(p)
    a, b = sim.sample_seeded([3, 4]), sim.sample_seeded([3, 4])
    assert torch.equal(a.frames_NCHW, b.frames_NCHW) and torch.equal(a.bg_NCHW, b.bg_NCHW)
    assert torch.equal(a.bg_NCHW[1], sim.sample(1, 4).bg_NCHW[0])
    assert torch.equal(a.bg_NHW, a.bg_NCHW[:, 1])


@given(h=st.integers(4, 48), w=st.integers(4, 48), res=st.integers(1, 8), seed=st.integers(0, 2 ** 31))
def test_perlin_is_bounded_and_smooth(h, w, res, seed):
    torch.manual_seed(seed)
    f_NHW = perlin_NHW(3, (h, w), res)
    assert f_NHW.shape == (3, h, w) and torch.isfinite(f_NHW).all()
    assert f_NHW.min() >= 0 and f_NHW.max() <= 1
    # Lipschitz: |d noise / d u| <= (15/8 * 2 sqrt 2 + 1) sqrt 2 / 2 < 4.5 per lattice cell, res / h cells per px
    assert (f_NHW[:, 1:] - f_NHW[:, :-1]).abs().max() <= 4.5 * res / h + 1e-5
    assert (f_NHW[:, :, 1:] - f_NHW[:, :, :-1]).abs().max() <= 4.5 * res / w + 1e-5


def test_perlin_background_is_smooth_structured_and_drifts():
    torch.manual_seed(0)
    bg = Background([50.0, 50.0], 3, perlin_amplitude=[80.0, 20.0], perlin_scale=[2, 8], drift=0.1)
    bg_NCHW = bg.sample(400, (40, 40))
    field_NCHW = bg_NCHW - 50.0
    assert field_NCHW.min() >= 0 and field_NCHW[:, 1].max() <= 100.0 + 1e-4
    # spatial structure: the field varies across the frame by tens of photons / px
    assert float(field_NCHW[:, 1].flatten(1).std(1).mean()) > 8.0
    # drift: each frame is the centre field times 1 + s (c - 1), one slope s in [-0.1, 0.1] per window
    centre_NHW = field_NCHW[:, 1]
    for c in (0, 2):
        ratio_N = (field_NCHW[:, c] * centre_NHW).sum((1, 2)) / (centre_NHW ** 2).sum((1, 2))
        assert torch.allclose(field_NCHW[:, c], ratio_N[:, None, None] * centre_NHW, atol=1e-3)
        assert (ratio_N - 1).abs().max() <= 0.1 + 1e-5 and (ratio_N - 1).abs().max() > 0.08
    slope_prev, slope_next = 1 - field_NCHW[:, 0].sum((1, 2)) / centre_NHW.sum((1, 2)), \
        field_NCHW[:, 2].sum((1, 2)) / centre_NHW.sum((1, 2)) - 1
    assert torch.allclose(slope_prev, slope_next, atol=1e-4)  # linear in time


def test_targets_carry_the_local_background_of_the_centre_frame():
    from decode_var.backend.builtin import BuiltinBackend
    from decode_var.data.targets import MultiScaleTargets

    p = param_from_dict({"Simulation": {"bg_perlin_amplitude": 100.0, "bg_perlin_scale": 3},
                         "VAR": {"bg_drift": 0.2}})
    batch = Simulator.parse(p).sample(4, seed=2)
    targets, _ = MultiScaleTargets.parse(p, BuiltinBackend())(batch.em, batch.bg_NHW, 4)
    fine_N6HW = targets[-1]
    assert torch.allclose(fine_N6HW[:, 5] * p.Scaling.bg_max, batch.bg_NCHW[:, 1], atol=1e-3)
    assert not torch.allclose(fine_N6HW[:, 5] * p.Scaling.bg_max, batch.bg_NCHW[:, 0], atol=1.0)
    assert float(batch.bg_NCHW.max()) <= p.Scaling.bg_max  # bg_max covers the field and its drift


def test_emitter_av_range_draws_a_density_per_sample():
    p = param_from_dict({"Simulation": {"emitter_av": [1.0, 15.0], "intensity_mu_sig": [5000.0, 0.0]},
                         "HyperParameter": {"emitter_label_photon_min": None}})
    batch = Simulator.parse(p).sample(400, seed=7)
    n_N = torch.bincount(batch.em.frame_ix, minlength=400).float()
    assert 6.5 < float(n_N.mean()) < 9.5  # mean of U(1, 15) = 8
    # far wider than one Poisson density of mean 8 (variance 8): U(1, 15) adds (14^2) / 12 = 16.3
    assert float(n_N.var()) > 16.0, float(n_N.var())
    assert float(n_N.quantile(0.1)) <= 3 and float(n_N.quantile(0.9)) >= 12


def test_emitter_av_fixed_keeps_the_emitters_of_a_seed():
    # a fixed density draws nothing extra: the emitters do not depend on the background options
    base = Simulator.parse(param_from_dict({})).sample(8, seed=3)
    p = param_from_dict({"Simulation": {"bg_perlin_amplitude": 30.0}, "VAR": {"bg_drift": 0.1}})
    other = Simulator.parse(p).sample(8, seed=3)
    assert torch.equal(base.em_all.xyz, other.em_all.xyz) and torch.equal(base.em_all.phot, other.em_all.phot)


@pytest.mark.parametrize("sim, var, match", [
    ({"emitter_av": [15.0, 1.0]}, {}, r"Simulation.emitter_av as a range must be \[low, high\]"),
    ({"emitter_av": [1.0, 2.0, 3.0]}, {}, r"Simulation.emitter_av must be two numbers"),
    ({"emitter_av": "many"}, {}, r"Simulation.emitter_av must be a number or a list"),
    ({"bg_perlin_amplitude": -1.0}, {}, r"Simulation.bg_perlin_amplitude must be >= 0"),
    ({"bg_perlin_amplitude": [10.0, 5.0], "bg_perlin_scale": [4]}, {},
     r"bg_perlin_scale must be an integer >= 1.*one per"),
    ({"bg_perlin_amplitude": 10.0, "bg_perlin_scale": 2.5}, {}, r"bg_perlin_scale must be an integer"),
    ({"bg_perlin_amplitude": 10.0, "bg_perlin_draw_amps": "yes"}, {}, r"bg_perlin_draw_amps must be true or false"),
    ({}, {"bg_drift": 2.0}, r"VAR.bg_drift must be a number in \[0, 1\]"),
])
def test_background_and_density_keys_are_validated(sim, var, match):
    with pytest.raises(ParamError, match=match):
        param_from_dict({"Simulation": sim, "VAR": var})


def test_model_p_init_from_an_emitter_av_range():
    from decode_var.nn.model import VARMultiScale

    def p_bias(emitter_av):  # the finest head's initial p logit
        return VARMultiScale.parse(param_from_dict({"Simulation": {"emitter_av": emitter_av}})).heads[-1].bias[0]

    assert torch.equal(p_bias([2.0, 10.0]), p_bias(6.0))  # a range initialises p from its mean density
    assert p_bias(2.0) < p_bias(6.0)


def _ks_2samp(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = torch.sort(a.double()).values, torch.sort(b.double()).values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


@pytest.mark.decode
def test_window_background_statistics_equal_decodes():
    """DECODE trains on windows cut from a frame stack whose background ``UniformBackground`` draws once
    per frame (``Simulation.forward``); the windows of the decode backend's simulator must look the same:
    constant over a frame, the same marginal, frames of a window independent, the centre frame's level
    in the target."""
    from decode.simulation.background import UniformBackground

    from decode_var.backend import get_backend

    p = param_from_dict({"Simulation": {"emitter_av": 0.0, "bg_uniform": [20.0, 200.0]}})
    n = 3000
    torch.manual_seed(0)
    stack_FHW = UniformBackground.parse(p).sample((n + 2, 40, 40))
    window_NC = torch.arange(1, n + 1)[:, None] + torch.tensor([-1, 0, 1])[None]  # frames t-1, t, t+1
    dec_NCHW = stack_FHW[window_NC]
    batch = get_backend("decode").simulator(p).sample(n, seed=0)
    ours_NCHW = batch.bg_NCHW
    assert ours_NCHW.shape == dec_NCHW.shape
    for bg_NCHW in (dec_NCHW, ours_NCHW):
        assert torch.equal(bg_NCHW.amax((2, 3)), bg_NCHW.amin((2, 3)))
    dec_NC, ours_NC = dec_NCHW[:, :, 0, 0], ours_NCHW[:, :, 0, 0]
    # KS critical distance at the 1e-4 level for n = m = 9000: 1.95 * sqrt(2 / 9000) = 0.029
    assert _ks_2samp(dec_NC.flatten(), ours_NC.flatten()) < 0.029
    for c0, c1 in ((0, 1), (1, 2), (0, 2)):
        step_dec = (dec_NC[:, c0] - dec_NC[:, c1]).abs()
        step_ours = (ours_NC[:, c0] - ours_NC[:, c1]).abs()
        assert _ks_2samp(step_dec, step_ours) < 0.045  # 1e-4 level for n = m = 3000
        assert abs(float(step_dec.mean()) - 60.0) < 3.0 and abs(float(step_ours.mean()) - 60.0) < 3.0
    assert torch.equal(batch.bg_NHW, ours_NCHW[:, 1])
