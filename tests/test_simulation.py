import math

import pytest
import torch

from decode_var.errors import ParamError
from decode_var.param import param_from_dict
from decode_var.simulation import Camera, GaussianPSF, Simulator, astigmatism


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
