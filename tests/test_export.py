"""Exports for Picasso and ThunderSTORM: an emitter at a known row and column of a TIFF comes back there."""
import csv
import math

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml
from hypothesis import given, settings, strategies as st

from decode_var.data.emitter_io import load_emitters
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError
from decode_var.inference.export import TS_COLUMNS_2D, TS_COLUMNS_3D, export, export_paths, save_picasso, save_thunderstorm
from decode_var.data.simulation import GaussianPSF
from decode_var.evaluation.crlb_scoring import CrlbModel
from decode_var.data.tiff import TiffStack

ROWS, COLS = 30, 44  # non-square, so that a swapped x / y cannot pass
ROW, COL, FRAME = 7.3, 31.6, 2  # the emitter: TIFF page 2, between rows 7 and 8, columns 31 and 32


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """Write a 3-page TIFF with one emitter, read it back as decode-var reads frames, and localize it by its
    centroid: the EmitterSet (DECODE's x = row, y = column) that every exporter receives."""
    folder = tmp_path_factory.mktemp("tiff")
    psf = GaussianPSF((-0.5, ROWS - 0.5), (-0.5, COLS - 0.5), (ROWS, COLS), sigma_0=1.2, mode_3d=False)
    frames = psf.forward(torch.tensor([[ROW, COL, 0.0]]), torch.tensor([5000.0]), torch.tensor([FRAME]), 3)
    tif = folder / "one_emitter.tif"
    tifffile.imwrite(tif, frames.numpy().astype(np.float32), photometric="minisblack")
    raw = tifffile.imread(tif)
    assert np.unravel_index(raw[FRAME].argmax(), raw[FRAME].shape) == (7, 32)  # row 7, column 32 of the file
    read = TiffStack(tif).read(0, 3)[FRAME]
    read = torch.as_tensor(np.asarray(read))
    r0, c0 = np.unravel_index(int(read.argmax()), read.shape)
    win = read[r0 - 4:r0 + 5, c0 - 4:c0 + 5].double()
    rr, cc = torch.meshgrid(torch.arange(r0 - 4, r0 + 5.0), torch.arange(c0 - 4, c0 + 5.0), indexing="ij")
    x, y = float((win * rr).sum() / win.sum()), float((win * cc).sum() / win.sum())
    assert abs(x - ROW) < 0.01 and abs(y - COL) < 0.01
    em = EmitterSet(torch.tensor([[x, y, 0.0]]), torch.tensor([5000.0]), torch.tensor([FRAME]),
                    bg=torch.tensor([12.0]), px_size=(100.0, 100.0))
    return em, x, y


def test_every_format_puts_the_emitter_back_at_its_row_and_column(located, tmp_path):
    em, x, y = located
    # DECODE's formats: x is the row
    for suffix in (".h5", ".csv"):
        path = export(em, tmp_path / f"em{suffix}", "decode")
        back = load_emitters(path)
        assert torch.allclose(back.xyz[0, :2], torch.tensor([x, y]), atol=1e-5) and int(back.frame_ix[0]) == FRAME
    # Picasso: x is the column, pixel centres at integers, frames from 0
    pic = export(em, tmp_path / "em_locs.hdf5", "picasso", frame_shape=(ROWS, COLS), n_frames=3)
    with h5py.File(pic) as f:
        locs = f["locs"][()]
    assert set(("frame", "x", "y", "photons", "sx", "sy", "bg", "lpx", "lpy")) <= set(locs.dtype.names)
    assert locs["frame"][0] == FRAME
    assert abs(locs["x"][0] - y) < 1e-4 and abs(locs["y"][0] - x) < 1e-4
    assert (int(np.floor(locs["y"][0] + 0.5)), int(np.floor(locs["x"][0] + 0.5))) == (7, 32)
    info = list(yaml.safe_load_all(pic.with_suffix(".yaml").read_text()))
    assert (info[0]["Width"], info[0]["Height"], info[0]["Frames"], info[0]["Pixelsize"]) == (COLS, ROWS, 3, 100.0)
    # ThunderSTORM: nm, x is the column, origin at the image corner (pixel i centred on i + 0.5), frames from 1
    ts = export(em, tmp_path / "em_ts.csv", "thunderstorm")
    with open(ts, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == TS_COLUMNS_2D and rows[0][2] == "x [nm]"
    assert ts.read_text().startswith('"id","frame","x [nm]","y [nm]","sigma [nm]","intensity [photon]"')
    rec = dict(zip(rows[0], map(float, rows[1])))
    assert rec["frame"] == FRAME + 1
    assert abs(rec["x [nm]"] - (y + 0.5) * 100) < 1e-3 and abs(rec["y [nm]"] - (x + 0.5) * 100) < 1e-3
    assert (int(rec["y [nm]"] // 100), int(rec["x [nm]"] // 100)) == (7, 32)
    assert rec["intensity [photon]"] == 5000.0 and rec["offset [photon]"] == 12.0


def test_non_square_pixels_convert_each_axis_with_its_own_size(tmp_path):
    em = EmitterSet(torch.tensor([[3.0, 10.0, 0.0]]), torch.tensor([1000.0]), torch.tensor([0]), px_size=(100.0, 120.0))
    path = save_thunderstorm(tmp_path / "t.csv", em)
    rec = dict(zip(*list(csv.reader(open(path)))[:2]))
    assert float(rec["x [nm]"]) == pytest.approx(10.5 * 120.0) and float(rec["y [nm]"]) == pytest.approx(3.5 * 100.0)
    with pytest.raises(InputDataError, match="square pixels"):
        save_picasso(tmp_path / "t_locs.hdf5", em, (20, 20))


def test_3d_exports_carry_z_and_precision(tmp_path):
    em = EmitterSet(torch.tensor([[5.0, 6.0, -120.0], [8.0, 2.0, 300.0]]), torch.tensor([2000.0, 500.0]),
                    torch.tensor([4, 1]), xyz_sig=torch.tensor([[0.1, 0.2, 30.0], [0.3, 0.4, 50.0]]),
                    px_size=(100.0, 100.0))
    pic = save_picasso(tmp_path / "z_locs.hdf5", em, (10, 10), width_px=np.array([1.5, 1.1]))
    with h5py.File(pic) as f:
        locs = f["locs"][()]
    assert list(locs["frame"]) == [1, 4]  # sorted by frame, as Picasso expects
    assert np.allclose(locs["z"], [300.0, -120.0]) and np.allclose(locs["lpz"], [50.0, 30.0])
    assert np.allclose(locs["lpx"], [0.4, 0.2]) and np.allclose(locs["lpy"], [0.3, 0.1])  # Picasso x = DECODE y
    assert np.allclose(locs["sx"], 1.1) and np.allclose(locs["sy"], 1.5)
    ts = save_thunderstorm(tmp_path / "z.csv", em)
    rows = list(csv.reader(open(ts)))
    assert tuple(rows[0]) == TS_COLUMNS_3D
    assert float(rows[1][rows[0].index("z [nm]")]) == 300.0


def test_precision_falls_back_to_the_shot_noise_estimate(tmp_path):
    em = EmitterSet(torch.tensor([[5.0, 6.0, 0.0]]), torch.tensor([400.0]), torch.tensor([0]), px_size=(100.0, 100.0))
    with h5py.File(save_picasso(tmp_path / "s_locs.hdf5", em, (10, 10), width_px=np.array([1.0, 1.0]))) as f:
        locs = f["locs"][()]
    assert locs["lpx"][0] == pytest.approx(1.0 / 20) and locs["bg"][0] == 0.0


def test_export_paths_and_bad_format(tmp_path):
    assert export_paths(tmp_path / "run.h5", "picasso").name == "run_locs.hdf5"
    assert export_paths(tmp_path / "run.h5", "thunderstorm").name == "run_thunderstorm.csv"
    em = EmitterSet(torch.zeros(1, 3), torch.ones(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputDataError, match="Unknown export format 'rapidstorm'"):
        export(em, tmp_path / "x.csv", "rapidstorm")
    with pytest.raises(InputDataError, match="no pixel size"):
        export(em, tmp_path / "x.csv", "thunderstorm")


def test_convert_cli(located, tmp_path, capsys):
    from decode_var.data.emitter_io import save_emitters
    from decode_var.render_cli import convert_main

    em, x, y = located
    src = tmp_path / "fit.h5"
    save_emitters(src, em)
    out = tmp_path / "fit_locs.hdf5"
    assert convert_main([str(src), "--format", "picasso", "--out", str(out), "--frame-size", str(ROWS), str(COLS)]) == 0
    assert out.with_suffix(".yaml").exists()
    assert convert_main([str(src), "--format", "thunderstorm", "--out", str(tmp_path / "x.csv")]) == 0
    assert convert_main([str(tmp_path / "missing.h5"), "--format", "picasso", "--out", str(out)]) == 2
    assert "missing.h5" in capsys.readouterr().err


@pytest.mark.picasso
def test_picasso_reads_our_file(located, tmp_path):
    """Picasso's own loader (only where picassosr and its HDF5 reader are installed)."""
    pytest.importorskip("tables")
    pio = pytest.importorskip("picasso.io")
    em, x, y = located
    path = export(em, tmp_path / "p_locs.hdf5", "picasso", frame_shape=(ROWS, COLS), n_frames=3)
    locs, info = pio.load_locs(str(path))
    assert abs(float(np.asarray(locs["x"])[0]) - y) < 1e-4 and abs(float(np.asarray(locs["y"])[0]) - x) < 1e-4
    assert int(np.asarray(locs["frame"])[0]) == FRAME and info[0]["Width"] == COLS


def test_unknown_values_are_written_as_the_readers_expect(tmp_path):
    """ThunderSTORM (Java) parses "NaN", not numpy's "nan"; Picasso's optional lpz is left out when unknown."""
    em = EmitterSet(torch.tensor([[5.0, 6.0, 80.0]]), torch.tensor([900.0]), torch.tensor([0]), px_size=(100.0, 100.0))
    text = save_thunderstorm(tmp_path / "n.csv", em).read_text()
    assert "NaN" in text and "nan" not in text
    with h5py.File(save_picasso(tmp_path / "n_locs.hdf5", em, (10, 10))) as f:
        names = f["locs"].dtype.names
    assert "z" in names and "lpz" not in names


def test_fit_outputs_next_to_the_emitter_file(located, tmp_path):
    from decode_var.inference.export import write_fit_outputs
    from decode_var.config.param import param_from_dict, save_param

    em, x, y = located
    param_file = tmp_path / "param_run.yaml"
    save_param(param_file, param_from_dict({}))
    tif = tmp_path / "movie.tif"
    tifffile.imwrite(tif, np.zeros((3, ROWS, COLS), np.uint16), photometric="minisblack")
    written = write_fit_outputs(param_file, em, tmp_path / "fit.h5", tif, ["decode", "picasso", "thunderstorm"])
    names = sorted(p.name for p in written)
    assert names == ["fit_locs.hdf5", "fit_render.png", "fit_render.tif", "fit_thunderstorm.csv"]
    info = yaml.safe_load((tmp_path / "fit_locs.yaml").read_text())
    assert (info["Width"], info["Height"], info["Frames"]) == (COLS, ROWS, 3)  # from the TIFF, not the param
    assert tifffile.imread(tmp_path / "fit_render.tif").shape == (ROWS * 10, COLS * 10)
    assert write_fit_outputs(param_file, em, tmp_path / "b.h5", tif, ["decode"], render=False) == []


@settings(max_examples=25)
@given(xy=st.lists(st.tuples(st.floats(-0.49, 29.49), st.floats(-0.49, 43.49)), min_size=1, max_size=6),
       px=st.sampled_from([(100.0, 100.0), (65.0, 65.0), (107.0, 93.0)]), frame=st.integers(0, 10 ** 6))
def test_exports_invert_to_decode_coordinates(xy, px, frame):
    """Picasso (x = column, same centres) and ThunderSTORM (nm, x = column, + 0.5 px) map back to DECODE's x, y."""
    from decode_var.inference.export import picasso_table, thunderstorm_table

    xyz = torch.tensor([[a, b, 0.0] for a, b in xy])
    em = EmitterSet(xyz, torch.full((len(xy),), 1000.0), torch.full((len(xy),), frame), px_size=px)
    _, ts = thunderstorm_table(em)
    assert np.allclose(ts[:, 3] / px[0] - 0.5, xyz[:, 0].numpy(), atol=1e-4)  # y [nm] -> DECODE x (row)
    assert np.allclose(ts[:, 2] / px[1] - 0.5, xyz[:, 1].numpy(), atol=1e-4)  # x [nm] -> DECODE y (column)
    assert (ts[:, 1] == frame + 1).all()
    if px[0] == px[1]:
        locs = picasso_table(em, None)
        assert np.allclose(locs["y"], xyz[:, 0].numpy(), atol=1e-4) and np.allclose(locs["x"], xyz[:, 1].numpy(),
                                                                                     atol=1e-4)
        assert (locs["frame"] == frame).all()


# issue 27: nothing lost, nothing invented ---------------------------------------------------------
def _bad_rows():
    """Two good localizations among rows no reader can use: NaN x, inf y, NaN photons, frame -1 and 2^62."""
    nan, inf = float("nan"), float("inf")
    xyz = torch.tensor([[3.2, 4.6, 0.0], [nan, 1.0, 0.0], [2.0, inf, 0.0], [3.0, 3.0, 0.0], [4.0, 4.0, 0.0],
                        [14.2, 20.7, 0.0], [5.0, 5.0, 0.0]])
    phot = torch.tensor([1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 2000.0, nan])
    frame = torch.tensor([0, 1, 2, -1, 2 ** 62, 12, 3])
    return EmitterSet(xyz, phot, frame, bg=torch.full((7,), 10.0), px_size=(100.0, 100.0))


def test_rows_no_reader_can_use_are_dropped_with_a_count(tmp_path, capsys):
    """issue 27, found 5: ThunderSTORM got NaN, inf and negative frame numbers, both formats a frame index of
    2^62, and Picasso's yaml declared fewer frames and a smaller image than its localizations cover."""
    em = _bad_rows()
    pic = save_picasso(tmp_path / "b_locs.hdf5", em, (10, 10))
    assert "5 of 7 localizations dropped" in capsys.readouterr().err
    with h5py.File(pic) as f:
        locs = f["locs"][()]
    assert locs["frame"].tolist() == [0, 12] and np.allclose(locs["x"], [4.6, 20.7]) and np.isfinite(locs["lpx"]).all()
    info = yaml.safe_load(pic.with_suffix(".yaml").read_text())
    # the localization at row 14.2, column 20.7 of frame 12 lies inside what the yaml declares
    assert (info["Frames"], info["Height"], info["Width"]) == (13, 15, 22)
    ts = save_thunderstorm(tmp_path / "b.csv", em)
    err = capsys.readouterr().err
    assert "5 of 7 localizations dropped" in err and "3 with a non-finite x, y, z or photon count" in err
    assert "1 with a negative frame index" in err and "1 with a frame index beyond" in err
    rows = list(csv.reader(open(ts)))
    values = np.array(rows[1:], dtype=np.float64)
    assert np.isfinite(values).all() and values[:, 1].tolist() == [1, 13]


def test_frames_beyond_the_movie_are_dropped_and_the_yaml_describes_the_movie(tmp_path, capsys):
    em = EmitterSet(torch.tensor([[3.0, 4.0, 0.0], [5.0, 6.0, 0.0], [9.4, 2.0, 0.0]]), torch.full((3,), 800.0),
                    torch.tensor([0, 4, 5]), px_size=(100.0, 100.0))
    pic = export(em, tmp_path / "m_locs.hdf5", "picasso", frame_shape=(10, 10), n_frames=5)
    assert "1 with a frame index beyond the movie's 5 frames" in capsys.readouterr().err
    with h5py.File(pic) as f:
        assert f["locs"]["frame"].tolist() == [0, 4]
    info = yaml.safe_load(pic.with_suffix(".yaml").read_text())
    assert (info["Frames"], info["Height"], info["Width"]) == (5, 10, 10)
    ts = export(em, tmp_path / "m.csv", "thunderstorm", n_frames=5)
    assert [r[1] for r in list(csv.reader(open(ts)))[1:]] == ["1", "5"]


def test_convert_cli_writes_only_rows_thunderstorm_can_read(tmp_path, capsys):
    from decode_var.data.emitter_io import save_emitters
    from decode_var.render_cli import convert_main

    src = tmp_path / "bad.h5"
    save_emitters(src, _bad_rows())
    assert convert_main([str(src), "--format", "thunderstorm", "--out", str(tmp_path / "t.csv")]) == 0
    text = (tmp_path / "t.csv").read_text()
    assert "NaN" not in text and "nan" not in text and "inf" not in text.lower() and ",-" not in text
    assert len(text.splitlines()) == 3 and "5 of 7 localizations dropped" in capsys.readouterr().err


def _crlb_sigma(param, xyz, phot, bg):
    from decode_var.data.crlb import gaussian_crlb

    g = param.VAR.gaussian_psf
    return gaussian_crlb(xyz, phot, bg, sigma_0=g.sigma_0, foc_shift=g.foc_shift, rl_range=g.rl_range,
                         em_gain=param.Camera.em_gain is not None, mode_3d=g.mode_3d).double().sqrt().numpy()


def test_precision_is_the_crlb_scaled_by_the_model_card(tmp_path):
    """issue 27, found 7: lpx was width / sqrt(photons), 10-20 times below the measured error. Now: the CRLB of
    the run's PSF at each localization's photons and background x the card's RMSE / sqrt(CRLB) per axis; the
    model's own sigma, where it predicts one, still wins."""
    from decode_var.config.param import param_from_dict
    from decode_var.evaluation.model_card import camera_of, update_card, load_card

    param = param_from_dict({})
    update_card(tmp_path / "model.pt", camera_of(param), {"ratio_x": 1.5, "ratio_y": 2.5, "ratio_z": 3.0, "ratio_lat": 2.0,
                                               "n_matched": 412}, epoch=7)
    card = load_card(tmp_path)
    xyz, phot, bg = torch.tensor([[5.3, 6.8, -120.0], [8.0, 2.0, 300.0]]), torch.tensor([2000.0, 700.0]), \
        torch.tensor([15.0, 40.0])
    em = EmitterSet(xyz, phot, torch.tensor([0, 1]), bg=bg, px_size=(100.0, 100.0),
                    xyz_sig=torch.tensor([[float("nan")] * 3, [0.3, 0.4, 50.0]]))
    expected = _crlb_sigma(param, xyz[:1], phot[:1], bg[:1])[0]
    pic = export(em, tmp_path / "p_locs.hdf5", "picasso", (10, 10), 2, None, CrlbModel.parse(param), card)
    with h5py.File(pic) as f:
        locs = f["locs"][()]
    # Picasso x = DECODE y
    assert locs["lpx"][0] == pytest.approx(expected[1] * 2.5, rel=1e-5)
    assert locs["lpy"][0] == pytest.approx(expected[0] * 1.5, rel=1e-5)
    assert locs["lpz"][0] == pytest.approx(expected[2] * 3.0, rel=1e-5)
    assert np.allclose([locs["lpx"][1], locs["lpy"][1], locs["lpz"][1]], [0.4, 0.3, 50.0])  # the model's sigma
    precision = yaml.safe_load(pic.with_suffix(".yaml").read_text())["Precision"]
    assert "lpy x 1.5, lpx x 2.5, lpz x 3" in precision and "412 matched emitters, epoch 7" in precision
    assert str(tmp_path / "model_card.json") in precision and "predicted sigma where it gives one" in precision
    ts = export(em, tmp_path / "p.csv", "thunderstorm", None, 2, None, CrlbModel.parse(param), card)
    rec = dict(zip(*list(csv.reader(open(ts)))[:2]))
    lateral = math.sqrt(((expected[0] * 1.5 * 100) ** 2 + (expected[1] * 2.5 * 100) ** 2) / 2)
    assert float(rec["uncertainty_xy [nm]"]) == pytest.approx(lateral, rel=1e-5)
    assert "rows x 1.5, columns x 2.5, z x 3" in (tmp_path / "p-protocol.txt").read_text()


def test_without_a_card_the_precision_is_the_uncalibrated_crlb_and_says_so(tmp_path):
    from decode_var.config.param import param_from_dict

    param = param_from_dict({"VAR": {"gaussian_psf": {"mode_3d": False}}, "Camera": {"em_gain": None}})
    em = EmitterSet(torch.tensor([[5.3, 6.8, 0.0]]), torch.tensor([1500.0]), torch.tensor([0]),
                    bg=torch.tensor([25.0]), px_size=(100.0, 100.0))
    expected = _crlb_sigma(param, em.xyz, em.phot, em.bg)[0]
    pic = export(em, tmp_path / "u_locs.hdf5", "picasso", (10, 10), 1, None, CrlbModel.parse(param))
    with h5py.File(pic) as f:
        locs = f["locs"][()]
    assert locs["lpx"][0] == pytest.approx(expected[1], rel=1e-5) and locs["lpy"][0] == pytest.approx(expected[0],
                                                                                                      rel=1e-5)
    assert yaml.safe_load(pic.with_suffix(".yaml").read_text())["Precision"].startswith("uncalibrated CRLB")
    export(em, tmp_path / "u.csv", "thunderstorm", None, 1, None, CrlbModel.parse(param))
    assert "uncertainty: uncalibrated CRLB" in (tmp_path / "u-protocol.txt").read_text()


def test_many_localizations_interpolate_the_crlb_within_two_percent(monkeypatch):
    """Beyond CRLB_GRID_ABOVE rows the bound comes from a grid over z, photons and background (seconds for any
    number of rows instead of 50-300 us per row): within 2 % of the exact bound, sub-pixel positions included."""
    import decode_var.inference.export as ex
    from decode_var.config.param import param_from_dict

    param = param_from_dict({})
    gen = np.random.default_rng(3)
    n = 400
    xyz = np.column_stack([gen.uniform(0, 40, n), gen.uniform(0, 40, n), gen.uniform(-500, 500, n)])
    phot, bg = np.exp(gen.uniform(np.log(200), np.log(20000), n)), gen.uniform(0, 100, n)
    psf = CrlbModel.parse(param)
    exact = ex._crlb_var(psf, xyz, phot, bg)
    monkeypatch.setattr(ex, "CRLB_GRID_ABOVE", 10)
    grid = ex._crlb_var(psf, xyz, phot, bg)
    assert np.allclose(np.sqrt(grid / exact), 1.0, atol=0.02)


def test_fit_outputs_are_calibrated_by_the_card_next_to_the_model(located, tmp_path):
    """decode-var-fit's exports: the card next to --model scales the CRLB (write_fit_outputs(model=...))."""
    from decode_var.config.param import param_from_dict, save_param
    from decode_var.evaluation.model_card import camera_of, update_card
    from decode_var.inference.export import write_fit_outputs

    em, x, y = located
    param_file = tmp_path / "param_run.yaml"
    save_param(param_file, param_from_dict({}))
    update_card(tmp_path / "exp" / "model.pt", camera_of(param_from_dict({})),
                {"ratio_x": 2.0, "ratio_y": 2.0, "ratio_z": None, "ratio_lat": 2.0, "n_matched": 50}, epoch=3)
    tif = tmp_path / "movie.tif"
    tifffile.imwrite(tif, np.zeros((3, ROWS, COLS), np.uint16), photometric="minisblack")
    write_fit_outputs(param_file, em, tmp_path / "fit.h5", tif, ["picasso"], render=False)
    write_fit_outputs(param_file, em, tmp_path / "cal.h5", tif, ["picasso"], render=False,
                      model=tmp_path / "exp" / "model.pt")
    with h5py.File(tmp_path / "fit_locs.hdf5") as f, h5py.File(tmp_path / "cal_locs.hdf5") as g:
        assert g["locs"]["lpx"][0] == pytest.approx(2.0 * f["locs"]["lpx"][0], rel=1e-6)
    assert "uncalibrated" in yaml.safe_load((tmp_path / "fit_locs.yaml").read_text())["Precision"]
    assert "(50 matched emitters, epoch 3" in yaml.safe_load((tmp_path / "cal_locs.yaml").read_text())["Precision"]
