"""Super-resolution rendering: placement, chunking, blur, z colour, files, CLI."""
import numpy as np
import pytest
import tifffile
import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.inference.render import render, save_render


def _em(xyz, frame_ix=None, **kw):
    xyz = torch.as_tensor(xyz, dtype=torch.float32)
    n = len(xyz)
    frame_ix = torch.zeros(n, dtype=torch.long) if frame_ix is None else frame_ix
    return EmitterSet(xyz, torch.full((n,), 1000.0), frame_ix, px_size=(100.0, 100.0), **kw)


def test_histogram_puts_localizations_in_the_right_render_pixel():
    # pixel 2 (row) and 7 (column) centres: at 10 nm render px they land in render row 25, column 75
    em = _em([[2.0, 7.0, 0.0]] * 3 + [[0.0, 0.0, 0.0]])
    r = render(em, frame_shape=(6, 9), mode="hist")
    assert r.density_HW.shape == (60, 90) and r.z_HW is None
    assert r.density_HW[25, 75] == 3 and r.density_HW[5, 5] == 1 and r.density_HW.sum() == 4
    out = render(_em([[-0.6, 1.0, 0.0], [6.0, 1.0, 0.0]]), frame_shape=(6, 9), mode="hist")
    assert out.density_HW.sum() == 0  # outside the frames' field of view [-0.5, size - 0.5)


def test_chunks_and_frames_do_not_change_the_image():
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(5000, 3, generator=g) * torch.tensor([20.0, 30.0, 800.0]) - torch.tensor([0.5, 0.5, 400.0])
    frames = torch.randint(0, 10 ** 6, (5000,), generator=g)  # a long movie: no image per frame is made
    em = _em(xyz, frames)
    a = render(em, (20, 30), mode="gaussian", sigma_nm=25.0, chunk=333)
    b = render(em, (20, 30), mode="gaussian", sigma_nm=25.0)
    assert np.allclose(a.density_HW, b.density_HW) and np.allclose(a.z_HW, b.z_HW, equal_nan=True)
    assert a.density_HW.sum() == pytest.approx(5000, rel=0.02)  # the blur keeps the mass (up to the border)


def test_gaussian_blur_width_and_default_from_precision():
    em = _em([[10.0, 10.0, 0.0]] * 10, xyz_sig=torch.full((10, 3), 0.3))  # 30 nm precision
    r = render(em, (21, 21), px_nm=5.0)
    assert r.sigma_nm == pytest.approx(30.0, rel=1e-5)
    prof = r.density_HW[int(10.5 * 20)]
    cols = np.arange(prof.size) * 5.0 + 2.5
    mean = (prof * cols).sum() / prof.sum()
    assert np.sqrt((prof * (cols - mean) ** 2).sum() / prof.sum()) == pytest.approx(30.0, rel=0.1)
    assert render(_em([[1.0, 1.0, 0.0]]), (3, 3)).sigma_nm == 20.0  # no precision: 2 render px


def test_z_colour_is_the_mean_z_and_files_are_written(tmp_path):
    em = _em([[2.0, 2.0, -200.0], [2.0, 2.0, -100.0], [5.0, 7.0, 300.0]])
    r = render(em, (8, 10), mode="hist", z_range=(-400, 400))
    assert r.z_HW[25, 25] == pytest.approx(-150.0) and r.z_HW[55, 75] == pytest.approx(300.0)
    assert np.isnan(r.z_HW[0, 0])
    png, tif = save_render(r, tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and tif.suffix == ".tif"
    pages = tifffile.imread(tif)
    assert pages.dtype == np.float32 and pages.shape == (2, 80, 100)
    assert pages[0, 25, 25] == 2 and pages[1, 25, 25] == pytest.approx(-150.0)


def test_bad_render_requests_are_explained():
    with pytest.raises(InputDataError, match="too large"):
        render(_em([[1.0, 1.0, 0.0]]), (100000, 100000), px_nm=1.0)
    with pytest.raises(InputDataError, match="'gaussian' or 'hist'"):
        render(_em([[1.0, 1.0, 0.0]]), (4, 4), mode="splat")
    em = EmitterSet(torch.zeros(1, 3), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputDataError, match="--camera-px"):
        render(em, (4, 4))


def test_render_cli(tmp_path):
    from decode_var.data.emitter_io import save_emitters
    from decode_var.render_cli import render_main

    src = tmp_path / "fit.csv"
    save_emitters(src, _em([[3.0, 4.0, 10.0], [3.1, 4.2, -30.0]]))
    assert render_main([str(src), "--frame-size", "8", "8", "--px-size", "20"]) == 0
    assert (tmp_path / "fit_render.png").exists() and tifffile.imread(tmp_path / "fit_render.tif").shape == (2, 40, 40)
    assert render_main([str(src), "--mode", "hist", "--no-z-color", "--out", str(tmp_path / "h.png")]) == 0
    assert tifffile.imread(tmp_path / "h.tif").ndim == 2


def test_non_finite_localizations_are_skipped_with_a_count(tmp_path, capsys):
    """issue 27, found 8: render crashed on NaN or inf coordinates. They are skipped, counted on stderr, and the
    image is the one of the finite localizations (also when the field of view comes from their extent)."""
    nan, inf = float("nan"), float("inf")
    good = [[2.0, 7.0, -100.0], [4.0, 1.0, 200.0]]
    em = _em(good + [[nan, 3.0, 0.0], [1.0, inf, 0.0], [1.0, 2.0, -inf]])
    for frame_shape in ((6, 9), None):
        r = render(em, frame_shape, mode="hist")
        assert "3 of 5 localizations with a non-finite x, y or z skipped" in capsys.readouterr().err
        ref = render(_em(good), frame_shape, mode="hist")
        assert np.array_equal(r.density_HW, ref.density_HW) and r.density_HW.sum() == 2
        assert np.array_equal(r.z_HW, ref.z_HW, equal_nan=True) and r.z_range == ref.z_range
    assert len(save_render(render(em, (6, 9)), tmp_path / "r.png")) == 2
