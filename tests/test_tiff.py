import numpy as np
import pytest
import tifffile
import torch

from decode_var.backend import decode_available
from decode_var.core.errors import InputDataError
from decode_var.data.tiff import TiffStack, window_batches, window_indices


def _frames(t=10, h=12, w=9, dtype=np.uint16):
    return (np.arange(t * h * w) % 1000).reshape(t, h, w).astype(dtype)


WRITERS = {
    "plain": dict(),
    "imagej": dict(imagej=True),
    "no_meta": dict(metadata=None),
    "zlib": dict(compression="zlib"),
    "big_endian": dict(byteorder=">"),
    "bigtiff": dict(bigtiff=True),  # 64-bit offsets: what a movie over 4 GB is written as
    "bigtiff_pages": dict(bigtiff=True, contiguous=False),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_reads_what_was_written(tmp_path, kind):
    a = _frames()
    tifffile.imwrite(tmp_path / "s.tif", a, **WRITERS[kind])
    with TiffStack(tmp_path / "s.tif") as s:
        assert len(s) == 10 and s.shape == (10, 12, 9)
        out = s.read(3, 7)
        assert out.dtype == np.float32 and out.shape == (4, 12, 9)
        np.testing.assert_array_equal(out, a[3:7].astype(np.float32))
        np.testing.assert_array_equal(s[-1], a[-1])
        np.testing.assert_array_equal(s.read(), a)
        assert s.read(5, 5).shape == (0, 12, 9)
        assert (s._offset is None) == (kind == "zlib")  # contiguous files are memory-mapped


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_dtypes_and_single_frame(tmp_path, dtype):
    a = _frames(1, 5, 6, dtype)[0]
    tifffile.imwrite(tmp_path / "one.tif", a)
    s = TiffStack(tmp_path / "one.tif")
    assert s.shape == (1, 5, 6)
    np.testing.assert_array_equal(s.read(0, 1)[0], a.astype(np.float32))


@pytest.mark.parametrize("kind", sorted(WRITERS))
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated(tmp_path, kind, keep):
    tifffile.imwrite(tmp_path / "s.tif", _frames(), **WRITERS[kind])
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(InputDataError, match="t.tif.*(truncated|corrupt)"):
        TiffStack(tmp_path / "t.tif").read()


def test_bad_files(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        TiffStack(tmp_path / "missing.tif")
    with pytest.raises(InputDataError, match="not a file"):
        TiffStack(tmp_path)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputDataError, match="empty"):
        TiffStack(tmp_path / "empty.tif")
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff" * 20)
    with pytest.raises(InputDataError, match="junk.tif is not a readable TIFF"):
        TiffStack(tmp_path / "junk.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputDataError, match="2D grayscale"):
        TiffStack(tmp_path / "rgb.tif")
    tifffile.imwrite(tmp_path / "tc.tif", np.zeros((3, 2, 8, 8), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(InputDataError, match=r"\(T, H, W\)"):
        TiffStack(tmp_path / "tc.tif")
    tifffile.imwrite(tmp_path / "t1.tif", np.ones((3, 1, 8, 8), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    assert TiffStack(tmp_path / "t1.tif").shape == (3, 8, 8)  # a singleton channel is fine


def _write_frame_by_frame(path, frames, how):
    """A movie saved frame by frame: one TIFF series per frame (or per block of frames)."""
    if how == "append":
        for f in frames:
            tifffile.imwrite(path, f, append=True)
        return
    with tifffile.TiffWriter(path) as tw:
        if how == "blocks":
            for block in (frames[:3], frames[3:4], frames[4:]):
                tw.write(block, contiguous=False, photometric="minisblack")
            return
        for f in frames:
            tw.write(f, contiguous=False, compression="zlib" if how == "zlib" else None)


@pytest.mark.parametrize("how", ["append", "not_contiguous", "zlib", "blocks"])
def test_a_movie_saved_frame_by_frame_is_read_whole(tmp_path, how):
    a = _frames()
    _write_frame_by_frame(tmp_path / "m.tif", a, how)
    with TiffStack(tmp_path / "m.tif") as s:
        assert s.shape == (10, 12, 9) and s.dtype == np.uint16
        np.testing.assert_array_equal(s.read(), a)
        np.testing.assert_array_equal(s.read(2, 7), a[2:7])
        np.testing.assert_array_equal(s[-1], a[-1])


@pytest.mark.parametrize("extra,layout", [
    (np.zeros((3, 3), np.uint16), "series 0-9: shape (12, 9) YX uint16; series 10: shape (3, 3) YX uint16"),
    (np.zeros((12, 9), np.float32), "series 0-9: shape (12, 9) YX uint16; series 10: shape (12, 9) YX float32"),
    (np.zeros((8, 8, 3), np.uint8), "series 0-9: shape (12, 9) YX uint16; series 10: shape (8, 8, 3) YXS uint8"),
])
def test_series_of_different_frames_are_refused_naming_the_layout(tmp_path, extra, layout):
    _write_frame_by_frame(tmp_path / "m.tif", _frames(), "append")
    tifffile.imwrite(tmp_path / "m.tif", extra, append=True, photometric="rgb" if extra.ndim == 3 else None)
    with pytest.raises(InputDataError, match="m.tif holds 11 shaped series") as err:
        TiffStack(tmp_path / "m.tif")
    assert f"({layout})" in str(err.value)


@pytest.mark.parametrize("cut", [1, 100, 215])
def test_truncated_movie_saved_frame_by_frame(tmp_path, cut):
    """The last frame's data (216 bytes, at the end of the file) cut short: its page is still listed."""
    _write_frame_by_frame(tmp_path / "m.tif", _frames(), "append")
    data = (tmp_path / "m.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[:-cut])
    with pytest.raises(InputDataError, match="t.tif.*(truncated|corrupt)"):
        TiffStack(tmp_path / "t.tif").read()


@pytest.mark.parametrize("window", [3, 5, 7])
def test_skipped_frames_end_the_windows_like_the_ends_of_the_stack(window):
    """Each window shows only frames of its own run between skipped frames, clamped to that run: the
    window a frame would have in a stack holding just that run."""
    skip = torch.zeros(12, dtype=torch.bool)
    skip[[0, 4, 5, 9]] = True
    runs = [(1, 3), (6, 8), (10, 11)]  # first, last frame of each run of frames kept
    half = window // 2
    for first, last in runs:
        for i in range(first, last + 1):
            expected = [min(max(j, first), last) for j in range(i - half, i + half + 1)]
            got = window_indices(torch.tensor([i]), 12, window, skip_T=skip)[0].tolist()
            assert got == expected, (i, got, expected)
    # the same with a block of frames 3 .. 11 (``first``): the indices stay the stack's
    got = window_indices(torch.tensor([6, 7]), 12, window, skip_T=skip[3:], first=3)
    assert got.tolist() == window_indices(torch.tensor([6, 7]), 12, window, skip_T=skip).tolist()


def _expected_window(frames, i, window):
    half = window // 2
    return np.stack([frames[min(max(j, 0), len(frames) - 1)] for j in range(i - half, i + half + 1)])


@pytest.mark.parametrize("window,batch", [(3, 4), (1, 3), (5, 2), (3, 100)])
def test_window_batches_replicate_ends(tmp_path, window, batch):
    a = _frames(7, 4, 5)
    tifffile.imwrite(tmp_path / "s.tif", a)
    for source in (TiffStack(tmp_path / "s.tif"), torch.from_numpy(a.astype(np.float32)), a):
        got = list(window_batches(source, batch, frame_window=window))
        ix = torch.cat([g[0] for g in got])
        assert ix.tolist() == list(range(7))
        frames = torch.cat([g[1] for g in got])
        assert frames.dtype == torch.float32 and frames.shape == (7, window, 4, 5)
        for i in range(7):
            np.testing.assert_array_equal(frames[i].numpy(), _expected_window(a, i, window))


def test_window_batches_range_and_errors():
    a = np.random.default_rng(0).random((9, 3, 3)).astype(np.float32)
    got = list(window_batches(a, 2, start=6))
    assert [g[0].tolist() for g in got] == [[6, 7], [8]]
    np.testing.assert_array_equal(got[-1][1][0].numpy(), a[[7, 8, 8]])
    with pytest.raises(ValueError):
        next(window_batches(a, 2, frame_window=2))
    with pytest.raises(ValueError):
        next(window_batches(a, 0))
    assert window_indices(torch.tensor([0, 8]), 9, 5).tolist() == [[0, 0, 0, 1, 2], [6, 7, 8, 8, 8]]


@pytest.mark.decode
@pytest.mark.skipif(not decode_available(), reason="real DECODE 0.10 is not importable")
@pytest.mark.parametrize("window", [1, 3, 5])
def test_windows_same_as_decode_inference_dataset(window):
    from decode.neuralfitter.dataset import InferenceDataset

    frames = torch.rand(6, 4, 5, generator=torch.Generator().manual_seed(0))
    ds = InferenceDataset(frames=frames, frame_proc=None, frame_window=window)
    ours = torch.cat([f for _, f in window_batches(frames, 4, frame_window=window)])
    assert len(ds) == len(ours)
    for i in range(len(ds)):
        assert torch.equal(ds[i], ours[i])


@pytest.mark.slow
def test_a_bigtiff_over_4_gb_is_read_at_its_far_end(tmp_path):
    """Frames past the 4 GiB mark (offsets a 32-bit TIFF cannot hold) are read where they are, lazily: the
    first and last frames and a block across the mark, without reading the rest."""
    t, h, w = 8300, 512, 512  # 4.35 GB of uint16
    path = tmp_path / "big.tif"
    stack = tifffile.memmap(path, shape=(t, h, w), dtype=np.uint16, bigtiff=True)  # one series, written in place
    for k in range(0, t, 500):
        stack[k:k + 500] = np.arange(k, min(k + 500, t), dtype=np.uint16)[:, None, None]
    stack.flush()
    del stack
    assert path.stat().st_size > 4 * 2 ** 30
    with TiffStack(path) as s:
        assert len(s) == t and s.shape == (t, h, w)
        assert float(s[0][0, 0]) == 0 and float(s[-1][h - 1, w - 1]) == t - 1
        mark = 4 * 2 ** 30 // (h * w * 2)  # the frame at the 4 GiB mark
        block = s.read(mark - 2, mark + 3)
        np.testing.assert_array_equal(block[:, 5, 7], np.arange(mark - 2, mark + 3, dtype=np.float32))
