"""The movie benchmark's own pieces: blinking movie emitters and the classical Gaussian MLE fitter
(``benchmarks/bench_movie.py``); a wrong baseline would make its comparison meaningless."""
import importlib.util
import math
from pathlib import Path

import torch
from hypothesis import given, settings, strategies as st

from decode_var.config.param import param_from_dict
from decode_var.data.simulation import GaussianPSF, Simulator, astigmatism

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_movie", REPO / "benchmarks" / "bench_movie.py")
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)


def _roi(x, y, n, b, sx, sy, R=7):
    """Expected photons of an elliptical pixel-integrated Gaussian on an R x R ROI (x along rows)."""
    c = torch.arange(R, dtype=torch.float64) - (R - 1) / 2
    ex = bm._integrated_1d(c, torch.tensor([x], dtype=torch.float64), torch.tensor([sx], dtype=torch.float64))[0]
    ey = bm._integrated_1d(c, torch.tensor([y], dtype=torch.float64), torch.tensor([sy], dtype=torch.float64))[0]
    return b + n * ex[0][:, None] * ey[0][None, :]


@settings(max_examples=25)
@given(x=st.floats(-0.5, 0.5), y=st.floats(-0.5, 0.5), sx=st.floats(0.9, 1.8), sy=st.floats(0.9, 1.8),
       n=st.floats(1000.0, 10000.0), b=st.floats(10.0, 150.0))
def test_mle_recovers_a_noiseless_emitter(x, y, sx, sy, n, b):
    theta = bm.mle_fit(_roi(x, y, n, b, sx, sy)[None], n_iter=30)[0]
    assert torch.allclose(theta, torch.tensor([x, y, n, b, sx, sy], dtype=torch.float64), rtol=2e-3, atol=2e-3), theta


def test_mle_on_poisson_noise_is_unbiased_and_near_the_crlb():
    torch.manual_seed(0)
    mu = _roi(0.2, -0.3, 3000.0, 50.0, 1.2, 1.0)
    theta = bm.mle_fit(torch.poisson(mu.expand(2000, 7, 7).contiguous()))
    assert abs(float(theta[:, 0].mean()) - 0.2) < 0.01 and abs(float(theta[:, 1].mean()) + 0.3) < 0.01
    # lateral sd of a Poisson MLE, about the CRLB: sigma / sqrt(N) inflated by the background, < 0.06 px here
    assert float(theta[:, 0].std()) < 0.06 and float(theta[:, 1].std()) < 0.06
    assert abs(float(theta[:, 2].mean()) / 3000.0 - 1) < 0.03


def test_pixels_outside_the_frame_do_not_enter_the_fit():
    roi = _roi(-1.0, 0.3, 5000.0, 30.0, 1.1, 1.1)
    roi[:2] = float("nan")  # the ROI hangs over the frame's edge
    theta = bm.mle_fit(roi[None], n_iter=30)[0]
    assert torch.allclose(theta[:2], torch.tensor([-1.0, 0.3], dtype=torch.float64), atol=1e-3)


def test_z_from_widths_inverts_the_astigmatic_curve():
    z = torch.tensor([-700.0, -300.0, 0.0, 245.0, 600.0])
    assert torch.allclose(bm.z_from_widths(astigmatism(z, 1.0, 250.0, 280.0).double(), 1.0, 250.0, 280.0), z,
                          atol=2.5)


def test_movie_emitters_blink_at_the_asked_density():
    p = param_from_dict({"Simulation": {"intensity_mu_sig": [5000.0, 0.0]}})
    sim = Simulator.parse(p)
    torch.manual_seed(1)
    xyz, phot, frame, ident = bm.blinking_emitters(sim, 400, 6.0)
    assert frame.min() >= 0 and frame.max() < 400
    assert 5.0 < len(frame) / 400 < 7.0  # about 6 emitters on per frame
    assert torch.all(phot <= 5000.0 + 1e-3) and torch.all(phot > 0)
    span = torch.zeros(int(ident.max()) + 1).index_add_(0, ident, torch.ones(len(ident)))
    assert float(span[span > 0].mean()) > 1.5  # emitters span frames (lifetime 1 frame: about 2 on average)
    same = ident[:, None] == ident[None, :]
    assert torch.equal((xyz[:, None] - xyz[None])[same].abs().sum(), torch.tensor(0.0))


def test_classical_fitter_finds_sparse_emitters_in_a_movie():
    p = param_from_dict({})
    frames, gt = bm.simulate_movie(p, 40, 1.5, "per_frame", seed=3)
    assert frames.dtype.name == "uint16" and frames.shape == (40, 40, 40)
    m = bm.score(p, bm.classical_fit(frames, p, 30.0), gt, 40)
    assert m["jac"] > 0.6 and m["rmse_lat"] < 60.0, m


def test_movie_backgrounds():
    torch.manual_seed(0)
    const = bm.movie_background("const", 250, (8, 8), 20.0, 200.0)
    assert torch.equal(const[0], const[99]) and not torch.equal(const[99], const[100])
    per_frame = bm.movie_background("per_frame", 250, (8, 8), 20.0, 200.0)
    assert (per_frame[1:, 0, 0] != per_frame[:-1, 0, 0]).all()
    smooth = bm.movie_background("smooth", 250, (40, 40), 20.0, 200.0)
    assert float(smooth[0].std()) > 5.0 and math.isclose(float(smooth[-1].sum() / smooth[0].sum()), 0.6, rel_tol=1e-4)


def test_gaussian_psf_matches_the_fit_model():
    # the fitter's model is the simulator's PSF: same pixel integration and axes (x = rows)
    psf = GaussianPSF((-0.5, 6.5), (-0.5, 6.5), (7, 7), sigma_0=1.0, mode_3d=True)
    z = torch.tensor([200.0])
    img = psf.forward(torch.tensor([[3.3, 2.8, 200.0]]), torch.tensor([1000.0]), torch.tensor([0]), 1)[0]
    s = astigmatism(z, 1.0, 250.0, 280.0)[0]
    assert torch.allclose(img.double(), _roi(0.3, -0.2, 1000.0, 0.0, float(s[0]), float(s[1])), atol=1e-3)
