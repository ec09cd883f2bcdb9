"""Exports for Picasso and ThunderSTORM: an emitter at a known row and column of a TIFF comes back there."""
import csv

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
