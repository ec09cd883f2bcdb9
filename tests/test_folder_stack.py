"""A folder of TIFF files is one movie (issue 25 item 5: movies as they come): natural name order, lazy,
one frame size and pixel type, and decode-var-fit takes the folder as --frames."""
import numpy as np
import pytest
import tifffile

from decode_var.core.errors import InputDataError
from decode_var.data.tiff import FolderStack, open_stack

import hostile_cli


def _frames(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(100, 400, size=(n, size, size)).astype(np.uint16)


def test_files_are_read_in_natural_name_order_as_one_movie(tmp_path):
    """frame_2 comes before frame_10 (a plain sort would not); a file may hold several frames; other files
    in the folder are ignored."""
    frames = _frames(12)
    names = [f"frame_{i}.tif" for i in (1, 2, 10, 11)]  # 3 frames each
    for k, name in enumerate(names):
        tifffile.imwrite(tmp_path / name, frames[3 * k:3 * k + 3], photometric="minisblack")
    (tmp_path / "metadata.txt").write_text("exposure 10 ms\n")
    stack = open_stack(tmp_path)
    assert isinstance(stack, FolderStack) and stack.shape == (12, 16, 16) and stack.dtype == np.uint16
    assert np.array_equal(stack.read(), frames.astype(np.float32))
    assert np.array_equal(stack.read(2, 8), frames[2:8].astype(np.float32))  # across three files
    assert np.array_equal(stack[11], frames[11].astype(np.float32))


def test_files_of_another_frame_size_or_no_tiff_are_refused_by_name(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _frames(2), photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", _frames(2, size=20), photometric="minisblack")
    with pytest.raises(InputDataError, match="b.tif holds 20 x 20 px uint16 frames, a.tif 16 x 16 px uint16"):
        FolderStack(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="holds no .tif / .tiff files"):
        open_stack(empty)


def test_decode_var_fit_takes_a_folder(tmp_path):
    exp = hostile_cli.train_tiny_model(tmp_path / "model")
    movie = tmp_path / "movie"
    movie.mkdir()
    frames = hostile_cli.adu_frames(6)
    for i, f in enumerate(frames):
        tifffile.imwrite(movie / f"img_{i}.tif", f, photometric="minisblack")
    run = hostile_cli.fit(exp, movie, tmp_path / "em.h5")
    assert run.rc == 0 and run.clean and "fitted 6 of 6 frames (16 x 16 px)" in run.out, run.err


def test_a_render_tiff_is_not_written_into_the_frame_folder(tmp_path):
    """--out inside the movie folder would put <out>_render.tif among the frames of the next fit: refused
    before anything is written."""
    from decode_var.fit import main as fit_main

    exp = hostile_cli.train_tiny_model(tmp_path / "model")
    movie = tmp_path / "movie"
    movie.mkdir()
    for i, f in enumerate(hostile_cli.adu_frames(3)):
        tifffile.imwrite(movie / f"img_{i}.tif", f, photometric="minisblack")
    run = hostile_cli.run_cli(fit_main, ["-p", exp / "param_run.yaml", "--model", exp / "model.pt", "--frames", movie,
                                         "--out", movie / "em.h5", "--no-progress"])
    assert run.rc == 2 and run.clean and "em_render.tif" in run.err and "frame folder" in run.err, run.err
    assert sorted(p.name for p in movie.iterdir()) == ["img_0.tif", "img_1.tif", "img_2.tif"]
