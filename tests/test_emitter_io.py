import math
import os
import stat

import numpy as np
import pytest
import torch

from decode_var.core.atomic import atomic_write, atomic_write_text
from decode_var.backend import decode_available
from decode_var.data.emitter_io import load_emitters, save_emitters
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import InputDataError

FORMATS = [".h5", ".csv", ".pt"]


def _full(n=7, unit="px"):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    return EmitterSet(r(n, 3) * torch.tensor([40.0, 40.0, 1000.0]), r(n) * 5000, torch.arange(n) % 3,
                      id=torch.arange(n) + 100, prob=r(n), bg=r(n) * 50, xyz_cr=r(n, 3), phot_cr=r(n), bg_cr=r(n),
                      xyz_sig=r(n, 3), phot_sig=r(n), bg_sig=r(n), xy_unit=unit, px_size=(106.7, 100.0))


def _assert_same(a: EmitterSet, b: EmitterSet):
    assert len(a) == len(b) and a.xy_unit == b.xy_unit
    for k in ("xyz", "phot", "frame_ix", "id", "prob", "bg", "xyz_cr", "phot_cr", "bg_cr", "xyz_sig", "phot_sig",
              "bg_sig"):
        va, vb = getattr(a, k), getattr(b, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            assert torch.equal(va, vb), k  # float32 survives every format bit for bit
    assert (a.px_size is None) == (b.px_size is None)
    if a.px_size is not None:
        assert torch.equal(a.px_size, b.px_size)


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("unit", ["px", "nm"])
def test_round_trip_full(tmp_path, suffix, unit):
    em = _full(unit=unit)
    save_emitters(tmp_path / f"em{suffix}", em)
    _assert_same(em, load_emitters(tmp_path / f"em{suffix}"))


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_minimal_fills_decode_defaults(tmp_path, suffix):
    em = EmitterSet(torch.tensor([[1.5, 2.5, -30.0], [3.0, 4.0, 0.0]]), torch.tensor([100.0, 200.0]),
                    torch.tensor([0, 4]), xy_unit="px", px_size=(100.0, 100.0))
    back = load_emitters(save_emitters(tmp_path / f"em{suffix}", em))
    assert torch.equal(back.xyz, em.xyz) and torch.equal(back.frame_ix, em.frame_ix)
    assert back.prob.tolist() == [1.0, 1.0]  # DECODE's default probability
    assert torch.isnan(back.bg).all()


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_empty_and_no_px_size(tmp_path, suffix):
    back = load_emitters(save_emitters(tmp_path / f"e{suffix}", EmitterSet.empty(px_size=(100.0, 100.0))))
    assert len(back) == 0 and back.px_size.tolist() == [100.0, 100.0]
    em = _full(3)
    em.px_size = None
    back = load_emitters(save_emitters(tmp_path / f"n{suffix}", em))
    assert back.px_size is None
    assert load_emitters(tmp_path / f"n{suffix}", px_size=(50.0, 50.0)).px_size.tolist() == [50.0, 50.0]


def test_csv_layout_is_decode(tmp_path):
    save_emitters(tmp_path / "em.csv", _full(2))
    lines = (tmp_path / "em.csv").read_text().splitlines()
    assert lines[0] == "# DECODE EmitterSet"
    assert lines[2].startswith('# {"xy_unit": "px", "px_size": [')
    assert lines[3] == ("x,y,z,phot,frame_ix,id,prob,bg,phot_cr,bg_cr,phot_sig,bg_sig,x_cr,y_cr,z_cr,x_sig,y_sig,"
                        "z_sig")
    assert len(lines) == 6


def test_plain_csv_ground_truth(tmp_path):
    p = tmp_path / "gt.csv"
    p.write_text("frame_ix, x, y, z, phot, id\n0, 1.5, 2.5, -100, 1000, 7\n3, 4, 5, 200, 2000, 8\n")
    em = load_emitters(p, px_size=(100.0, 100.0))
    assert em.xy_unit == "px" and em.frame_ix.tolist() == [0, 3] and em.id.tolist() == [7, 8]
    torch.testing.assert_close(em.xyz_nm, torch.tensor([[150.0, 250.0, -100.0], [400.0, 500.0, 200.0]]))
    p.write_text("x,y,phot,frame_ix\n150,250,1000,0\n")
    em = load_emitters(p, xy_unit="nm")
    assert em.xy_unit == "nm" and em.xyz.tolist() == [[150.0, 250.0, 0.0]]  # z defaults to 0 nm


@pytest.mark.parametrize("content,match", [
    ("x,y,z,phot\n1,2,3,4\n", r"lacks the columns \['frame_ix'\]"),
    ("frame_ix,z\n1,2\n", r"\['x', 'y', 'phot'\]"),
    ("", "no header"),
    ("frame_ix,x,y,phot\n0,1,2\n", "3 fields"),
    ("frame_ix,x,y,phot\n0,1,abc,3\n", "not a number"),
    ("frame_ix,x,y,phot\n0.5,1,2,3\n", "whole numbers"),
    ("# {broken json\nframe_ix,x,y,phot\n", "JSON"),
])
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(InputDataError, match=match) as err:
        load_emitters(p)
    assert "bad.csv" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        load_emitters(tmp_path / "missing.h5")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputDataError, match="unknown suffix"):
        load_emitters(tmp_path / "x.txt")
    with pytest.raises(InputDataError, match="unknown suffix"):
        save_emitters(tmp_path / "x.json", _full(1))
    (tmp_path / "junk.h5").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(InputDataError, match="junk.h5.*HDF5"):
        load_emitters(tmp_path / "junk.h5")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(InputDataError, match="junk.pt"):
        load_emitters(tmp_path / "junk.pt")
    import h5py

    with h5py.File(tmp_path / "nodata.h5", "w") as f:
        f.create_group("data").create_dataset("xyz", data=np.zeros((2, 3), np.float32))
    with pytest.raises(InputDataError, match=r"nodata.h5 lacks the datasets \['phot', 'frame_ix'\]"):
        load_emitters(tmp_path / "nodata.h5")
    torch.save({"data": {"xyz": torch.zeros(2, 3), "phot": torch.zeros(3), "frame_ix": torch.zeros(2).long()},
                "meta": {"xy_unit": "px", "px_size": None}}, tmp_path / "ragged.pt")
    with pytest.raises(InputDataError, match="'phot' has 3 rows"):
        load_emitters(tmp_path / "ragged.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputDataError, match="holds a list"):
        load_emitters(tmp_path / "list.pt")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.h5"
    save_emitters(target, _full(2))
    before = target.read_bytes()

    def failing(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    seen = []
    atomic_write(tmp_path / "a.csv", lambda tmp: seen.append(tmp.suffix) or tmp.write_text("x"))
    assert seen == [".csv"]  # writers that pick the format by suffix still work
    atomic_write_text(tmp_path / "sub" / "t.txt", "hello")
    assert (tmp_path / "sub" / "t.txt").read_text() == "hello"


needs_decode = pytest.mark.skipif(not decode_available(), reason="real DECODE 0.10 is not importable")


@pytest.mark.decode
@needs_decode
@pytest.mark.parametrize("suffix", FORMATS)
def test_decode_reads_our_files(tmp_path, suffix):
    import warnings

    from decode.generic.emitter import EmitterSet as DEmitterSet
    from decode.utils import emitter_io as d_io

    em = _full()
    path = save_emitters(tmp_path / f"em{suffix}", em)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = DEmitterSet.load(path)
    assert torch.equal(loaded.xyz, em.xyz) and torch.equal(loaded.phot, em.phot)
    assert torch.equal(loaded.frame_ix, em.frame_ix) and loaded.xy_unit == "px"
    assert torch.equal(loaded.xyz_cr, em.xyz_cr) and torch.equal(loaded.xyz_sig, em.xyz_sig)
    torch.testing.assert_close(torch.as_tensor(loaded.px_size).float(), em.px_size)
    if suffix == ".h5":
        data, meta, dmeta = d_io.load_h5(path)
        assert torch.equal(data["id"], em.id) and torch.equal(data["bg"], em.bg)
        assert torch.equal(data["prob"], em.prob) and "version" in dmeta
        em2 = _full()
        em2.bg_sig = None  # all-nan optional field: DECODE writes an empty dataset and loads None
        data, _, _ = d_io.load_h5(save_emitters(tmp_path / "em2.h5", em2))
        assert data["bg_sig"] is None


@pytest.mark.decode
@needs_decode
@pytest.mark.parametrize("suffix", FORMATS)
def test_we_read_decode_files(tmp_path, suffix):
    from decode.generic.emitter import EmitterSet as DEmitterSet

    ours = _full()
    theirs = DEmitterSet(**{k: v for k, v in ours.to_dict().items()})
    theirs.save(tmp_path / f"d{suffix}")
    back = load_emitters(tmp_path / f"d{suffix}")
    if suffix == ".csv":  # pandas writes shortest float reprs; values stay float32-exact
        for k in ("xyz", "phot", "bg", "prob", "xyz_cr", "xyz_sig"):
            assert torch.equal(getattr(back, k), getattr(ours, k)), k
        assert torch.equal(back.frame_ix, ours.frame_ix) and torch.equal(back.id, ours.id)
    else:
        _assert_same(ours, back)
    assert math.isclose(back.px_size[0].item(), 106.7, rel_tol=1e-6)


def test_atomic_torch_save(tmp_path):
    from decode_var.core.atomic import atomic_torch_save, atomic_write_bytes

    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["w"].tolist() == [0, 1, 2]
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
