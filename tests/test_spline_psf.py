"""Built-in cubic-spline PSF: calibration files, rendering conventions, DECODE parity."""
import math
import warnings

import numpy as np
import pytest
import scipy.io as sio
import torch
from hypothesis import given, settings, strategies as st

from decode_var.core.errors import InputDataError, ParamError
from decode_var.config.param import param_from_dict
from decode_var.data.simulation import GaussianPSF, Simulator
from decode_var.data.spline_psf import (OUT_OF_ROI_VALUE, SplineCalibration, SplinePSF, gaussian_pixel_model,
                                   load_calibration, make_calibration, save_calibration)

GAUSS = dict(sigma_0=1.0, foc_shift=250.0, rl_range=280.0)


@pytest.fixture(scope="module")
def calib():
    """A small calibration fitted to the package's astigmatic Gaussian (13 px ROI, z -400..400 nm)."""
    return make_calibration(gaussian_pixel_model(**GAUSS), roi_size=13, z_range_nm=(-400.0, 400.0), dz_nm=50.0)


@pytest.fixture(scope="module")
def calib_file(calib, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "demo_3dcal.mat"
    save_calibration(path, calib)
    return path


def _param(calib_file, **sim):
    base = {"img_size": [32, 24], "psf_extent": [[-0.5, 31.5], [-0.5, 23.5], None],
            "emitter_extent": [[-0.5, 31.5], [-0.5, 23.5], [-350.0, 350.0]]}
    base.update(sim)
    return param_from_dict({"VAR": {"psf": "spline", "backend": "builtin"}, "InOut": {"calibration_file": str(calib_file)},
                            "Simulation": base, "TestSet": {"img_size": [32, 24]}})


def reference_frames(calib: SplineCalibration, xyz, phot, frame_ix, n_frames, img_shape, roi=None, auto=False):
    """Scalar float64 transcription of the documented model (module docstring of decode_var.data.spline_psf)."""
    c = calib.coeff_XYZ64.astype(np.float64)
    nx, ny, nz = c.shape[:3]
    rx, ry = roi or (nx, ny)
    ref = calib.x0 - 1.0
    ref_re = ((rx - 1) // 2, (ry - 1) // 2) if auto else (ref, ref)
    out = np.zeros((n_frames, *img_shape))
    for (x, y, z), n, f in zip(np.asarray(xyz, np.float64), np.asarray(phot, np.float64), np.asarray(frame_ix)):
        xc = -(x % 1.0) - (ref_re[0] - ref)
        yc = -(y % 1.0) - (ref_re[1] - ref)
        zc = calib.z0 - z / calib.dz_nm
        sx, sy, sz = math.floor(xc), math.floor(yc), math.floor(zc)
        dx, dy, dz = xc - sx, yc - sy, zc - sz
        kz = min(max(sz, 0), nz - 1)
        corner = (math.floor(x - ref_re[0]), math.floor(y - ref_re[1]))
        for i in range(rx):
            for j in range(ry):
                vx, vy = sx + i, sy + j
                if 0 <= vx < nx and 0 <= vy < ny:
                    val = n * sum(c[vx, vy, kz, 16 * cc + 4 * b + a] * dx ** a * dy ** b * dz ** cc
                                  for a in range(4) for b in range(4) for cc in range(4))
                else:
                    val = OUT_OF_ROI_VALUE
                p, q = corner[0] + i, corner[1] + j
                if 0 <= p < img_shape[0] and 0 <= q < img_shape[1]:
                    out[f, p, q] += val
    return out


# calibration files ----------------------------------------------------------------------------------
def test_calibration_round_trip_in_smap_structure(calib, calib_file):
    back = load_calibration(calib_file)
    assert np.array_equal(back.coeff_XYZ64, calib.coeff_XYZ64)
    assert (back.dz_nm, back.z0, back.x0) == (50.0, 8.0, 7.0)
    assert back.z_range_nm == (-400.0, 400.0) and back.ref0 == (6.0, 6.0, 8.0)
    # the layout DECODE's SMAPSplineCoefficient reads: SXY.cspline.{coeff, dz, z0, x0}
    raw = sio.loadmat(str(calib_file), struct_as_record=False, squeeze_me=True)["SXY"].cspline
    assert raw.coeff.shape == (13, 13, 16, 64) and raw.dz == 50.0 and raw.x0 == 7.0 and raw.z0 == 8.0


def test_spline_fitted_to_gaussian_reproduces_it(calib):
    psf = SplinePSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), calib)
    gauss = GaussianPSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), **GAUSS)
    xyz = torch.tensor([[10.3, 12.8, -300.0], [20.0, 5.0, 0.0], [15.55, 17.21, 120.0], [3.9, 8.4, 350.0]])
    phot = torch.full((4,), 1000.0)
    ix = torch.arange(4)
    spline, ref = psf.forward(xyz, phot, ix, 4), gauss.forward(xyz, phot, ix, 4)
    for f, (x, y, _) in enumerate(xyz.round().long().tolist()):  # inside the 13 px ROI (it truncates wide PSFs)
        win = (f, slice(x - 4, x + 5), slice(y - 4, y + 5))
        assert (spline[win] - ref[win]).abs().max() < 0.01 * ref[f].max(), f
    assert torch.allclose(spline[1:3].sum((1, 2)), phot[1:3], rtol=0.01)


def test_vectorised_render_matches_scalar_reference(calib):
    g = torch.Generator().manual_seed(3)
    n = 25
    # inside, on and past the frame edges; z inside and outside the calibrated range
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([40.0, 32.0, 1200.0]) - torch.tensor([4.0, 4.0, 600.0])
    phot = 500 + 2000 * torch.rand(n, generator=g)
    frame_ix = torch.randint(0, 3, (n,), generator=g)
    for roi, auto in ((None, False), ((9, 9), True), ((15, 11), False)):
        psf = SplinePSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), calib, roi_size=roi, roi_auto_center=auto)
        got = psf.forward(xyz, phot, frame_ix, 3).double().numpy()
        want = reference_frames(calib, xyz.double().numpy(), phot.numpy(), frame_ix.numpy(), 3, (32, 24), roi, auto)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * want.max())


@settings(max_examples=20)
@given(x=st.floats(5.0, 20.0), y=st.floats(5.0, 12.0), z=st.floats(-380.0, 380.0), kx=st.integers(-3, 3),
       ky=st.integers(-3, 3))
def test_integer_shift_moves_the_image(calib, x, y, z, kx, ky):
    """Pixel i is centred on i: moving an emitter by whole px moves its image by as many rows / columns."""
    psf = SplinePSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), calib)
    base = psf.forward(torch.tensor([[x, y, z]]), torch.tensor([1000.0]), torch.tensor([0]), 1)[0]
    moved = psf.forward(torch.tensor([[x + kx, y + ky, z]]), torch.tensor([1000.0]), torch.tensor([0]), 1)[0]
    inner = (slice(7, 24), slice(7, 17))
    shifted = torch.roll(base, (kx, ky), (0, 1))
    assert torch.allclose(moved[inner], shifted[inner], atol=1e-3)


def test_orientation_x_is_the_row(calib):
    psf = SplinePSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), calib)
    frame = psf.forward(torch.tensor([[25.0, 4.0, 0.0]]), torch.tensor([1000.0]), torch.tensor([0]), 1)[0]
    assert divmod(int(frame.argmax()), 24) == (25, 4)
    assert psf.forward(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long), 2).shape == (2, 32, 24)


def test_extent_must_match_frame(calib):
    with pytest.raises(ParamError, match="psf_extent"):
        SplinePSF((-0.5, 63.5), (-0.5, 23.5), (32, 24), calib)


# bad calibration files ----------------------------------------------------------------------------
@pytest.mark.parametrize("drop", ["coeff", "dz", "z0", "x0"])
def test_missing_field_is_named(tmp_path, calib, drop):
    fields = {"coeff": calib.coeff_XYZ64, "dz": 50.0, "z0": 8.0, "x0": 7.0}
    del fields[drop]
    path = tmp_path / "bad_3dcal.mat"
    sio.savemat(str(path), {"SXY": {"cspline": fields}})
    with pytest.raises(InputDataError, match=rf"bad_3dcal.mat.*SXY\.cspline\.{drop}"):
        load_calibration(path)


def test_malformed_calibrations_are_named(tmp_path, calib_file):
    no_sxy = tmp_path / "other.mat"
    sio.savemat(str(no_sxy), {"PSF": np.zeros(3)})
    with pytest.raises(InputDataError, match=r"other.mat lacks the struct 'SXY'"):
        load_calibration(no_sxy)
    no_cspline = tmp_path / "gauss_only.mat"
    sio.savemat(str(no_cspline), {"SXY": {"gauss": 1.0}})
    with pytest.raises(InputDataError, match=r"gauss_only.mat lacks the field 'SXY.cspline'"):
        load_calibration(no_cspline)
    wrong = tmp_path / "wrong.mat"
    sio.savemat(str(wrong), {"SXY": {"cspline": {"coeff": np.zeros((4, 4, 2, 10)), "dz": 1.0, "z0": 0.0, "x0": 1.0}}})
    with pytest.raises(InputDataError, match=r"wrong.mat: SXY.cspline.coeff has shape \(4, 4, 2, 10\)"):
        load_calibration(wrong)
    truncated = tmp_path / "truncated_3dcal.mat"
    truncated.write_bytes(calib_file.read_bytes()[:3000])
    with pytest.raises(InputDataError, match=r"truncated_3dcal.mat"):
        load_calibration(truncated)
    with pytest.raises(InputDataError, match=r"nowhere.mat does not exist"):
        load_calibration(tmp_path / "nowhere.mat")


# the builtin backend ------------------------------------------------------------------------------
def test_builtin_simulator_uses_the_spline(calib_file):
    p = _param(calib_file)
    sim = Simulator.parse(p)
    assert isinstance(sim.psf, SplinePSF)
    a, b = sim.sample(4, seed=2), sim.sample(4, seed=2)
    assert a.frames_NCHW.shape == (4, 3, 32, 24) and torch.equal(a.frames_NCHW, b.frames_NCHW)
    assert torch.isfinite(a.frames_NCHW).all()


def test_missing_calibration_file_says_how_to_make_one(tmp_path):
    p = _param(tmp_path / "absent_3dcal.mat")
    with pytest.raises(ParamError, match=r"absent_3dcal.mat does not exist.*decode-var-make-calibration"):
        Simulator.parse(p)


def test_emitters_past_the_calibrated_z_range_warn(calib_file):
    p = _param(calib_file, emitter_extent=[[-0.5, 31.5], [-0.5, 23.5], [-750.0, 750.0]])
    with pytest.warns(UserWarning, match=r"reaches past the range"):
        SplinePSF.parse(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SplinePSF.parse(_param(calib_file))


def test_make_calibration_cli(tmp_path):
    from decode_var.calibration_cli import main

    out = tmp_path / "cli_3dcal.mat"
    assert main(["--out", str(out), "--roi-size", "9", "--z-range", "-200", "200", "--dz", "100"]) == 0
    assert load_calibration(out).shape == (9, 9, 4)
    assert main(["--out", str(tmp_path / "x.mat"), "--roi-size", "8"]) == 2


# DECODE parity ------------------------------------------------------------------------------------
@pytest.mark.decode
@pytest.mark.parametrize("roi_size,auto", [(None, False), ([9, 9], True)])
def test_builtin_spline_equals_decode_cubic_spline_psf(calib_file, roi_size, auto):
    """Same calibration file and emitters through DECODE's CubicSplinePSF (via the backend bridge) and ours."""
    from decode_var.backend import get_backend

    p = _param(calib_file, roi_size=roi_size, roi_auto_center=auto)
    theirs = get_backend("decode").psf(p)
    ours = SplinePSF.parse(p)
    g = torch.Generator().manual_seed(7)
    n = 200
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([40.0, 32.0, 700.0]) - torch.tensor([4.0, 4.0, 350.0])
    phot = 500 + 5000 * torch.rand(n, generator=g)
    frame_ix = torch.randint(0, 6, (n,), generator=g)
    f_theirs = theirs.forward(xyz, phot, frame_ix, 6)
    f_ours = ours.forward(xyz, phot, frame_ix, 6)
    assert torch.allclose(f_ours, f_theirs, rtol=1e-5, atol=1e-5 * float(f_theirs.max()))
    # and the CRLB (DECODE: analytic spline derivatives; ours: autograd), sCMOS
    bg = 10 + 100 * torch.rand(n, generator=g)
    keep = slice(0, 20)
    crlb_theirs, _ = theirs.psf.crlb(xyz[keep], phot[keep], bg[keep])
    crlb_ours = ours.crlb(xyz[keep], phot[keep], bg[keep])
    if auto:
        assert torch.allclose(crlb_ours, crlb_theirs.float(), rtol=1e-3)
    else:
        # Without auto-centring the 13 x 13 ROI reaches past the calibration's coefficient grid, where
        # SplinePSF's C code sets every derivative to 0, d/dbg included (it should be 1): DECODE then
        # counts less Fisher information for photons and background than the model holds (seen: phot
        # 2.5 %, bg 20 %, z up to 4 % off). Zeroed rows of the Jacobian can only remove information, so
        # DECODE's bounds are never below ours; x and y, whose information lies inside the grid, agree.
        assert torch.allclose(crlb_ours[:, :2], crlb_theirs.float()[:, :2], rtol=1e-3)
        assert (crlb_ours <= crlb_theirs.float() * (1 + 1e-4)).all()


def test_train_and_eval_on_the_spline_psf_without_decode(tmp_path, calib_file):
    """VAR.psf: spline through the builtin backend: a tiny training run and an evaluation."""
    import yaml

    from decode_var.eval_cli import run as run_eval
    from decode_var.train import train

    param = {"HyperParameter": {"epochs": 1, "pseudo_ds_size": 16, "batch_size": 8}, "TestSet": {"test_size": 8},
             "Simulation": {"img_size": [16, 16], "psf_extent": [[-0.5, 15.5], [-0.5, 15.5], None],
                            "emitter_extent": [[-0.5, 15.5], [-0.5, 15.5], [-350, 350]], "emitter_av": 2.0},
             "InOut": {"experiment_out": str(tmp_path / "out"), "calibration_file": str(calib_file)},
             "VAR": {"backend": "builtin", "psf": "spline", "scales": [0.25, 0.5, 1.0],
                     "model": {"features": 8, "token_dim": 16, "depth": 1, "heads": 2}, "train": {"plot": False}}}
    path = tmp_path / "spline.yaml"
    path.write_text(yaml.safe_dump(param))
    trainer = train(path, progress=False)
    exp = trainer.exp_dir
    assert (exp / "model.pt").is_file()
    metrics = run_eval(exp / "param_run.yaml", exp / "model.pt", tmp_path / "eval", n=4, report=False)
    assert (tmp_path / "eval" / "metrics.json").is_file() and metrics["n_gt"] > 0
    # and a fit of a spline-PSF movie (ADU) with the exports and the render next to the emitter file
    import tifffile

    from decode_var.fit import main as fit_main
    from decode_var.config.param import load_param

    sim = Simulator.parse(load_param(exp / "param_run.yaml"))
    sim.camera.photon_units = False
    movie = sim.sample(2, seed=3).frames_NCHW.reshape(-1, 16, 16).clamp(0, 65535).round().numpy().astype(np.uint16)
    tif = tmp_path / "movie.tif"
    tifffile.imwrite(tif, movie, photometric="minisblack")
    out = tmp_path / "fit.h5"
    assert fit_main(["-p", str(exp / "param_run.yaml"), "--model", str(exp / "model.pt"), "--frames", str(tif),
                     "--out", str(out), "--format", "picasso", "thunderstorm", "--no-progress"]) == 0
    for name in ("fit.h5", "fit_locs.hdf5", "fit_locs.yaml", "fit_thunderstorm.csv", "fit_render.png", "fit_render.tif"):
        assert (tmp_path / name).is_file(), name
    assert yaml.safe_load((tmp_path / "fit_locs.yaml").read_text())["Frames"] == 6


def test_wrong_shapes_are_named(calib):
    from decode_var.core.errors import ShapeError

    psf = SplinePSF((-0.5, 31.5), (-0.5, 23.5), (32, 24), calib)
    with pytest.raises(ShapeError, match=r"xyz \(E, 3\) and phot \(E,\), got \(2, 2\)"):
        psf.rois(torch.zeros(2, 2), torch.ones(2))
