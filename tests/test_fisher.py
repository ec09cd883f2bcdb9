"""CRLB of any PSF from autograd Fisher information (decode_var.data.fisher) against the analytic Gaussian bound."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.data.crlb import gaussian_crlb
from decode_var.data.fisher import crlb_from_model
from decode_var.data.simulation import astigmatism
from decode_var.data.spline_psf import SplinePSF, gaussian_pixel_model, make_calibration

ROI = 25  # gaussian_crlb's default ROI, centred on the emitter's pixel


def gaussian_roi_model(sigma_0=1.0, foc_shift=250.0, rl_range=280.0, mode_3d=True):
    """Pixel-integrated Gaussian on the 25 x 25 px ROI centred on round(x), round(y): mu (E, 625), float64."""

    def model(xyz_E3, phot_E, bg_E):
        steps = torch.arange(-(ROI // 2), ROI // 2 + 2, dtype=xyz_E3.dtype) - 0.5
        edges_x = torch.round(xyz_E3[:, :1].detach()) + steps
        edges_y = torch.round(xyz_E3[:, 1:2].detach()) + steps
        if mode_3d:
            sig = astigmatism(xyz_E3[:, 2], sigma_0, foc_shift, rl_range) * math.sqrt(2)
        else:
            sig = torch.full_like(xyz_E3[:, :2], sigma_0 * math.sqrt(2))
        px = 0.5 * torch.diff(torch.erf((edges_x - xyz_E3[:, :1]) / sig[:, :1]), dim=1)
        py = 0.5 * torch.diff(torch.erf((edges_y - xyz_E3[:, 1:2]) / sig[:, 1:]), dim=1)
        return (phot_E[:, None, None] * px[:, :, None] * py[:, None, :]).flatten(1) + bg_E[:, None]

    return model


@settings(max_examples=15)
@given(x=st.floats(0.0, 60.0), y=st.floats(0.0, 60.0), z=st.floats(-700.0, 700.0), phot=st.floats(200.0, 20000.0),
       bg=st.floats(1.0, 300.0), em=st.booleans())
def test_autograd_crlb_matches_analytic_gaussian(x, y, z, phot, bg, em):
    xyz = torch.tensor([[x, y, z]], dtype=torch.float64)
    analytic = gaussian_crlb(xyz, [phot], [bg], sigma_0=1.0, em_gain=em)
    auto = crlb_from_model(gaussian_roi_model(), xyz, [phot], [bg], em_gain=em)
    assert torch.allclose(auto, analytic, rtol=1e-3), (auto, analytic)


def test_2d_model_gives_nan_z_like_the_analytic_bound():
    xyz = torch.tensor([[10.2, 11.7, 0.0], [5.5, 5.0, 0.0]], dtype=torch.float64)
    phot, bg = torch.tensor([3000.0, 800.0]), torch.tensor([50.0, 20.0])
    analytic = gaussian_crlb(xyz, phot, bg, sigma_0=1.3, mode_3d=False)
    auto = crlb_from_model(gaussian_roi_model(sigma_0=1.3, mode_3d=False), xyz, phot, bg)
    assert torch.isnan(auto[:, 2]).all() and torch.isnan(analytic[:, 2]).all()
    cols = [0, 1, 3, 4]
    assert torch.allclose(auto[:, cols], analytic[:, cols], rtol=1e-3)


def test_spline_crlb_close_to_the_gaussian_it_was_fitted_to():
    calib = make_calibration(gaussian_pixel_model(), roi_size=25, z_range_nm=(-400.0, 400.0), dz_nm=50.0)
    psf = SplinePSF((-0.5, 39.5), (-0.5, 39.5), (40, 40), calib)
    xyz = torch.tensor([[20.3, 18.6, -200.0], [12.0, 30.0, 0.0], [25.5, 9.4, 250.0]], dtype=torch.float64)
    phot, bg = torch.tensor([2000.0, 5000.0, 1000.0]), torch.tensor([10.0, 50.0, 100.0])
    spline = psf.crlb(xyz, phot, bg, em_gain=True)
    analytic = gaussian_crlb(xyz, phot, bg, sigma_0=1.0, em_gain=True)
    ratio = (spline / analytic).sqrt()  # standard deviations
    assert torch.isfinite(spline).all()
    assert ((ratio[:, :3] - 1).abs() < 0.05).all(), ratio


def test_eval_reports_crlb_ratio_for_spline_runs(tmp_path):
    """Known errors (10 nm along x and y, 20 nm in z) against the spline PSF's CRLB: the ratios are those
    errors over the root mean bound, axis by axis."""
    from decode_var.core.emitters import EmitterSet
    from decode_var.evaluation.crlb_scoring import CrlbModel
    from decode_var.config.param import param_from_dict
    from decode_var.data.spline_psf import save_calibration

    path = tmp_path / "c_3dcal.mat"
    save_calibration(path, make_calibration(gaussian_pixel_model(), roi_size=15, z_range_nm=(-400.0, 400.0)))
    p = param_from_dict({"VAR": {"psf": "spline", "backend": "builtin"}, "InOut": {"calibration_file": str(path)},
                         "Simulation": {"emitter_extent": [[-0.5, 39.5], [-0.5, 39.5], [-350.0, 350.0]]}})
    gt = EmitterSet(torch.tensor([[10.2, 20.5, 100.0], [30.7, 8.1, -150.0]]), torch.tensor([3000.0, 4000.0]),
                    torch.tensor([0, 1]), bg=torch.tensor([50.0, 80.0]), px_size=(100.0, 100.0))
    pred = gt.clone()
    pred.xyz = pred.xyz + torch.tensor([[0.1, -0.1, 20.0], [-0.1, 0.1, -20.0]])
    crlb = CrlbModel.parse(p)
    out = crlb.metrics(pred, gt)
    var = crlb.of(gt).double()  # x, y in nm^2 (100 nm px), z in nm^2
    assert torch.isfinite(var[:, :3]).all() and (var[:, :3] > 0).all()
    assert out["crlb_ratio_x"] == pytest.approx(10.0 / math.sqrt(var[:, 0].mean()), rel=1e-4)
    assert out["crlb_ratio_y"] == pytest.approx(10.0 / math.sqrt(var[:, 1].mean()), rel=1e-4)
    assert out["crlb_ratio_z"] == pytest.approx(20.0 / math.sqrt(var[:, 2].mean()), rel=1e-4)
    assert out["crlb_ratio_lat"] == pytest.approx(math.sqrt(200.0) / math.sqrt((var[:, 0] + var[:, 1]).mean()),
                                                  rel=1e-4)