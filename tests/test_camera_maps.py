"""Per-pixel sCMOS maps (issue 25, item 4): simulation, ADU -> photons at fit time, ROI origin, bad maps."""
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings, strategies as st

from decode_var.config.param import param_from_dict
from decode_var.core.errors import ParamError
from decode_var.data.camera_maps import CameraMaps, load_map
from decode_var.data.simulation import Camera, FrameSettings, Simulator
from decode_var.inference.predictor import Predictor

CHIP = (12, 10)  # H_chip, W_chip (px)


def _maps(tmp_path, offset, gain, var, ext=".npy"):
    paths = {}
    for key, arr in (("offset_map", offset), ("gain_map", gain), ("read_var_map", var)):
        if arr is None:
            continue
        path = tmp_path / f"{key}{ext}"
        np.save(path, arr) if ext == ".npy" else tifffile.imwrite(path, arr)
        paths[key] = str(path)
    return paths


def _varied(seed=0, hw=CHIP):
    rng = np.random.default_rng(seed)
    return (rng.uniform(100, 200, hw), rng.uniform(0.5, 3.0, hw), rng.uniform(4.0, 50.0, hw))


def _param(camera: dict, **sections):
    base = {"em_gain": None, "qe": 1.0, "spur_noise": 0.0, "convert2photons": False}
    return param_from_dict({"Camera": {**base, **camera}, **sections})


def test_simulated_adu_mean_and_variance_follow_the_maps_per_pixel(tmp_path):
    offset, gain, var = _varied()
    cam = Camera.parse(_param(_maps(tmp_path, offset, gain, var), HyperParameter={"channels_in": 1}))
    n, lam = 4000, 20.0
    adu_NHW = cam.forward(torch.full((n, *CHIP), lam), torch.Generator().manual_seed(1)).double().numpy()
    # the training frame is the chip: one possible window. floor() costs half an ADU and adds 1/12 ADU^2
    mean_exp = offset + lam / gain - 0.5
    var_exp = lam / gain ** 2 + var + 1 / 12
    mean_err = np.abs(adu_NHW.mean(0) - mean_exp) / np.sqrt(var_exp / n)
    var_err = np.abs(adu_NHW.var(0, ddof=1) - var_exp) / (var_exp * np.sqrt(2 / (n - 1)))
    assert mean_err.max() < 5 and var_err.max() < 5


def _coded(hw):
    """An offset map whose value names its pixel: 1000 * row + column (ADU)."""
    return 1000.0 * np.arange(hw[0])[:, None] + np.arange(hw[1])[None, :] + 100.0


def test_each_sample_sits_at_one_random_window_of_the_chip(tmp_path):
    chip = (40, 30)
    paths = _maps(tmp_path, _coded(chip), None, np.zeros(chip))
    cam = Camera.parse(_param({**paths, "read_sigma": 0.0}, HyperParameter={"channels_in": 3}))
    x = torch.zeros(3 * 50, 8, 6)
    adu_NCHW = cam.forward(x, torch.Generator().manual_seed(3)).view(50, 3, 8, 6)
    again = cam.forward(x, torch.Generator().manual_seed(3)).view(50, 3, 8, 6)
    assert torch.equal(adu_NCHW, again)
    origins = set()
    for s in adu_NCHW:
        x0, y0 = divmod(int(s[0, 0, 0]) - 100, 1000)
        window = torch.as_tensor(_coded(chip)[x0:x0 + 8, y0:y0 + 6], dtype=torch.float32)
        assert all(torch.equal(f, window) for f in s)  # the sample's 3 frames share one window
        origins.add((x0, y0))
    assert len(origins) > 25  # 50 draws among 33 * 25 places


def test_simulator_with_maps_makes_frames_on_the_chip(tmp_path):
    paths = _maps(tmp_path, *_varied(hw=(64, 64)))
    p = _param({**paths, "convert2photons": True}, Simulation={"img_size": [32, 32]})
    batch = Simulator.parse(p).sample(2, seed=5)
    assert batch.frames_NCHW.shape == (2, 3, 32, 32) and torch.isfinite(batch.frames_NCHW).all()


@given(x0=st.integers(0, 7), y0=st.integers(0, 5), qe=st.floats(0.3, 1.0))
@settings(max_examples=20, deadline=None)
def test_fit_time_conversion_uses_the_window_at_roi_origin(tmp_path_factory, x0, y0, qe):
    tmp = tmp_path_factory.mktemp("maps")
    offset, gain, var = _varied(seed=2)
    p = _param({**_maps(tmp, offset, gain, var), "roi_origin": [x0, y0], "qe": qe, "convert2photons": True})
    cam = Camera.parse(p)
    photons_HW = np.random.default_rng(0).uniform(0, 500, (5, 5))
    win = (slice(x0, x0 + 5), slice(y0, y0 + 5))
    adu_THW = torch.as_tensor(offset[win] + photons_HW * qe / gain[win], dtype=torch.float32)[None].repeat(2, 1, 1)
    pred = SimpleNamespace(camera=cam, frames=FrameSettings.parse(p))
    got = Predictor.adu_to_photons(pred, adu_THW)
    assert np.allclose(got.numpy(), photons_HW[None], rtol=1e-4, atol=1e-2)


def test_uniform_maps_convert_as_the_scalar_keys(tmp_path):
    scalar = dict(qe=0.8, spur_noise=0.002, em_gain=None, e_per_adu=2.2, baseline=398.6, read_sigma=1.5)
    uniform = Camera(**scalar, maps=CameraMaps.parse(_param({**_maps(
        tmp_path, np.full(CHIP, 398.6), np.full(CHIP, 2.2), None), **scalar}).Camera))
    adu_THW = 390 + 200 * torch.rand(4, 9, 7)
    assert torch.allclose(uniform.backward(adu_THW), Camera(**scalar).backward(adu_THW), rtol=0, atol=1e-4)
    # no map given: the read variance is the scalar read_sigma over the gain, in ADU^2
    assert torch.allclose(uniform.maps.read_var_HW, torch.full(CHIP, (1.5 / 2.2) ** 2))


def test_without_maps_the_camera_is_the_scalar_one():
    cam = Camera.parse(param_from_dict({}))
    assert cam.maps is None
    x = torch.full((4, 16, 16), 30.0)
    g = torch.Generator().manual_seed(7)
    e = torch.poisson(x * cam.qe + cam.spur, generator=g)
    e = torch._standard_gamma(e.clamp(min=1e-12), generator=g) * cam.em_gain * (e > 0)
    e = e + cam.read_sigma * torch.randn(e.shape, generator=g)
    expected = cam.backward(torch.clamp(torch.floor(e / cam.e_per_adu) + cam.baseline, min=0.0))
    assert torch.equal(cam.forward(x, torch.Generator().manual_seed(7)), expected)


def test_tif_and_npy_maps_read_the_same(tmp_path):
    offset = _varied()[0].astype(np.float32)
    (tmp_path / "t").mkdir()
    a = load_map(_maps(tmp_path, offset, None, None)["offset_map"], "offset_map")
    b = load_map(_maps(tmp_path / "t", offset, None, None, ext=".tif")["offset_map"], "offset_map")
    assert np.array_equal(a, b) and a.shape == CHIP


@pytest.mark.parametrize("bad, match", [
    ({"offset_map": "missing.npy"}, "Camera.offset_map: no file"),
    ({"offset_map": np.zeros((2, *CHIP))}, "must be 2-D"),
    ({"read_var_map": np.full(CHIP, np.nan)}, "Camera.read_var_map: .* NaN"),
    ({"gain_map": np.zeros(CHIP)}, "Camera.gain_map has 120 pixels <= 0"),
    ({"read_var_map": -np.ones(CHIP)}, "Camera.read_var_map has 120 negative"),
    ({"gain_map": np.ones((5, 5))}, "different shapes"),
])
def test_bad_maps_fail_with_the_key_and_the_fix(tmp_path, bad, match):
    paths = _maps(tmp_path, np.full(CHIP, 100.0), None, None)
    for key, arr in bad.items():
        if isinstance(arr, str):
            paths[key] = str(tmp_path / arr)
        else:
            np.save(tmp_path / f"bad_{key}.npy", arr)
            paths[key] = str(tmp_path / f"bad_{key}.npy")
    with pytest.raises(ParamError, match=match):
        Camera.parse(_param(paths))


def test_frames_outside_the_chip_fail_with_roi_origin(tmp_path):
    cam = Camera.parse(_param({**_maps(tmp_path, np.full(CHIP, 100.0), None, None), "roi_origin": [4, 0]}))
    cam.backward(torch.zeros(1, 8, 10))  # rows 4..11: inside
    with pytest.raises(ParamError, match=r"The movie frame of 9 x 10 px at Camera.roi_origin \[4, 0\] leaves"):
        cam.backward(torch.zeros(1, 9, 10))
    with pytest.raises(ParamError, match=r"training frame \(Simulation.img_size\) of 16 x 16 px"):
        cam.forward(torch.zeros(3, 16, 16))


@pytest.mark.parametrize("camera, match", [
    ({"roi_origin": [-1, 0]}, "Camera.roi_origin must be two integers >= 0"),
    ({"roi_origin": [0.5, 0]}, "Camera.roi_origin must be two integers >= 0"),
    ({"gain_map": "gain.png"}, "Camera.gain_map must be the path of a .npy or .tif"),
])
def test_bad_map_keys_fail_at_validation(camera, match):
    with pytest.raises(ParamError, match=match):
        param_from_dict({"Camera": camera})


def test_maps_with_the_decode_backend_fail_at_validation():
    with pytest.raises(ParamError, match="VAR.backend: decode simulates with DECODE's camera"):
        param_from_dict({"Camera": {"offset_map": "offset.npy"}, "VAR": {"backend": "decode"}})
