import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.data.crlb import crlb_ratio, gaussian_crlb, mortensen_var
from decode_var.core.errors import ShapeError


@pytest.mark.parametrize("n_phot,bg", [(2000.0, 10.0), (5000.0, 100.0), (1000.0, 1.0), (500.0, 50.0)])
@pytest.mark.parametrize("em_gain", [False, True])
def test_matches_mortensen_mle_bound(n_phot, bg, em_gain):
    sigma = 1.3
    var = gaussian_crlb(torch.tensor([[10.0, 10.0, 0.0], [10.3, 9.8, 0.0]]), torch.tensor([n_phot] * 2),
                        torch.tensor([bg] * 2), sigma_0=sigma, mode_3d=False, em_gain=em_gain)
    ref = mortensen_var(n_phot, bg, sigma, em_gain=em_gain)
    assert var[:, 0].numpy() == pytest.approx(ref, rel=0.05)
    assert var[:, 1].numpy() == pytest.approx(ref, rel=0.05)
    # Mortensen's least-squares variance (the 16/9 formula) is not a bound: it lies above the CRLB
    sa2 = sigma ** 2 + 1 / 12
    ls = (2.0 if em_gain else 1.0) * sa2 / n_phot * (16 / 9 + 8 * math.pi * sa2 * bg / n_phot)
    assert (var[:, 0] < ls).all()


def _autograd_crlb(x, y, z, n, b, sigma_0, foc_shift, rl_range, roi):
    """Independent reference: the same image model, Fisher information from autograd."""
    half = roi // 2
    cx, cy = round(x), round(y)
    ex = torch.arange(cx - half, cx + half + 2, dtype=torch.float64) - 0.5
    ey = torch.arange(cy - half, cy + half + 2, dtype=torch.float64) - 0.5

    def model(theta):
        x_, y_, z_, n_, b_ = theta
        sx = sigma_0 * torch.sqrt(1 + ((z_ + foc_shift) / rl_range) ** 2)
        sy = sigma_0 * torch.sqrt(1 + ((z_ - foc_shift) / rl_range) ** 2)
        px = torch.diff(torch.erf((ex - x_) / (math.sqrt(2) * sx))) / 2
        py = torch.diff(torch.erf((ey - y_) / (math.sqrt(2) * sy))) / 2
        return (n_ * px[:, None] * py[None, :] + b_).reshape(-1)

    theta = torch.tensor([x, y, z, n, b], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model, theta)
    fisher = jac.t() @ (jac / model(theta)[:, None])
    return torch.linalg.inv(fisher).diagonal()


@settings(max_examples=20, deadline=None)
@given(x=st.floats(0, 30), y=st.floats(0, 30), z=st.floats(-700, 700), n=st.floats(200, 20000),
       b=st.floats(0.5, 200), sigma_0=st.floats(0.8, 2.0))
def test_analytic_derivatives_match_autograd(x, y, z, n, b, sigma_0):
    var = gaussian_crlb(torch.tensor([[x, y, z]]), torch.tensor([n]), torch.tensor([b]), sigma_0=sigma_0,
                        foc_shift=250.0, rl_range=280.0, roi_size=41)
    ref = _autograd_crlb(x, y, z, n, b, sigma_0, 250.0, 280.0, 41)
    np.testing.assert_allclose(var[0].double().numpy(), ref.numpy(), rtol=1e-4)


def test_astigmatism_symmetry_and_scaling():
    xyz = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 300.0], [5.0, 5.0, -300.0]])
    var = gaussian_crlb(xyz, torch.full((3,), 3000.0), torch.full((3,), 20.0), sigma_0=1.2)
    assert var[0, 0].item() == pytest.approx(var[0, 1].item(), rel=1e-5)  # in focus: round PSF
    assert var[1, 0].item() == pytest.approx(var[2, 1].item(), rel=1e-5)  # z -> -z swaps x and y
    assert var[1, 2].item() == pytest.approx(var[2, 2].item(), rel=1e-5)
    # without background the bound is exactly 1 / N for x, y, z
    v1 = gaussian_crlb(xyz, torch.full((3,), 1000.0), torch.full((3,), 1e-9), sigma_0=1.2)
    v2 = gaussian_crlb(xyz, torch.full((3,), 4000.0), torch.full((3,), 1e-9), sigma_0=1.2)
    np.testing.assert_allclose(v1[:, :3].numpy(), 4 * v2[:, :3].numpy(), rtol=1e-3)


def test_em_gain_doubles_and_2d_has_no_z():
    xyz = torch.tensor([[3.2, 4.7, 100.0]])
    a = gaussian_crlb(xyz, torch.tensor([2000.0]), torch.tensor([10.0]), sigma_0=1.0)
    b = gaussian_crlb(xyz, torch.tensor([2000.0]), torch.tensor([10.0]), sigma_0=1.0, em_gain=True)
    torch.testing.assert_close(b, 2 * a)
    c = gaussian_crlb(xyz[:, :2], torch.tensor([2000.0]), torch.tensor([10.0]), sigma_0=1.0, mode_3d=False)
    assert math.isnan(c[0, 2].item()) and torch.isfinite(c[0, [0, 1, 3, 4]]).all()


def test_vectorised_chunks_and_roi():
    g = torch.Generator().manual_seed(0)
    n = 50
    xyz = torch.cat([torch.rand(n, 2, generator=g) * 40, (torch.rand(n, 1, generator=g) - 0.5) * 1000], 1)
    phot, bg = torch.rand(n, generator=g) * 5000 + 500, torch.rand(n, generator=g) * 50 + 1
    full = gaussian_crlb(xyz, phot, bg, sigma_0=1.3)
    chunked = gaussian_crlb(xyz, phot, bg, sigma_0=1.3, chunk=7)
    torch.testing.assert_close(full, chunked)
    big = gaussian_crlb(xyz, phot, bg, sigma_0=1.3, roi_size=61)
    # the default 25 px ROI holds the PSF: x, y bounds do not change with a larger one; more pixels
    # never hurt, and the bg bound (and through it z, phot) tightens as more pixels show the background
    torch.testing.assert_close(full[:, :2], big[:, :2], rtol=1e-3, atol=0)
    assert (big <= full * (1 + 1e-4)).all()
    assert (big[:, 4] < full[:, 4]).all()
    assert gaussian_crlb(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0), sigma_0=1.0).shape == (0, 5)


def test_errors():
    with pytest.raises(ShapeError):
        gaussian_crlb(torch.zeros(3, 4), torch.ones(3), torch.ones(3), sigma_0=1.0)
    with pytest.raises(ShapeError):
        gaussian_crlb(torch.zeros(3, 3), torch.ones(2), torch.ones(3), sigma_0=1.0)
    with pytest.raises(ValueError):
        gaussian_crlb(torch.zeros(1, 3), torch.ones(1), torch.ones(1), sigma_0=1.0, roi_size=10)


def test_crlb_ratio():
    var = torch.tensor([[4.0, 1.0], [4.0, 3.0], [float("nan"), 2.0]])
    np.testing.assert_allclose(crlb_ratio([4.0, 2.0], var), [2.0, math.sqrt(2.0)])
    with pytest.raises(ShapeError):
        crlb_ratio([1.0, 2.0, 3.0], var)
