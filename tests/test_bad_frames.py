"""decode-var-fit loses nothing and invents nothing (issue 27): every frame of a movie saved frame by frame
is fitted, impossible frames (saturated, constant, below the camera baseline) are left out of their
neighbours' windows, no localization leaves the frame or the trained z range, and the output records
the frames read.

Oracle models (see ``test_fit_frames.PeakOracle``) make the expected emitters exact.
"""
import numpy as np
import pytest
import tifffile
import torch

from decode_var.config.param import load_param, save_param
from decode_var.data.emitter_io import load_emitters
from decode_var.fit import main as fit_main
from decode_var.registry import register_model
from decode_var.training.checkpoint import save_model

from test_fit_frames import PeakOracle
from test_train import TINY, write_param


@register_model("WindowPeakOracle")
class WindowPeakOracle(PeakOracle):
    """PeakOracle on the sum of the window's frames: whatever a neighbour holds shows in a frame's output."""

    def forward(self, frames_NCHW):
        return super().forward(frames_NCHW.sum(1, keepdim=True).expand(-1, self.channels_in, -1, -1))


@register_model("JunkOracle")
class JunkOracle(PeakOracle):
    """p = 1 on six cells of every frame, with offsets / z (network units) that put three of them outside
    the frame or the trained z range (Scaling.z_max = 1.2 * 750 nm): see :data:`JUNK`."""

    def forward(self, frames_NCHW):
        n, _, h, w = frames_NCHW.shape
        out = torch.zeros(n, 6, h, w)
        for (r, c), (dx, z) in JUNK.items():
            r = r % h
            out[:, 0, r, c], out[:, 1, r, c], out[:, 2, r, c], out[:, 4, r, c] = 1.0, 0.5, dx, z
        return out


#: cell (row, column; row -1 = the last) -> (x offset in px, z / z_max)
JUNK = {(2, 2): (0.0, 0.0), (12, 12): (0.0, -0.5),  # inside: x 2 and 12 px, z 0 and -450 nm
        (0, 5): (-2.0, 0.0), (-1, 7): (2.0, 0.0),  # x -2 px, x H + 1 px: outside the frame
        (8, 8): (0.0, 1.25),  # z 1125 nm: beyond the trained range [-750, 750] nm and its 300 nm margin
        (14, 14): (0.0, 8 / 9)}  # z 800 nm: beyond the range, within the margin (an edge emitter's z error)


def _model(folder, architecture, **camera):
    param = load_param(write_param(folder, HyperParameter={**TINY["HyperParameter"], "architecture": architecture},
                                   Camera={"convert2photons": False, **camera}))
    save_model(folder / "model.pt", PeakOracle(3))
    save_param(folder / "param_run.yaml", param)
    return folder


def _fit(folder, frames_THW, tmp_path, capsys, dtype=np.uint16, suffix="csv", name="stack"):
    """Fit ``frames_THW`` written as one TIFF stack (or a path to a TIFF); (emitters, stdout, stderr, out)."""
    stack, out = tmp_path / f"{name}.tif", tmp_path / f"{name}.{suffix}"
    if isinstance(frames_THW, np.ndarray):
        tifffile.imwrite(stack, frames_THW.astype(dtype), photometric="minisblack")
    else:
        stack = frames_THW
    rc = fit_main(["-p", str(folder / "param_run.yaml"), "--model", str(folder / "model.pt"), "--frames", str(stack),
                   "--out", str(out), "--no-progress", "--no-render"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return load_emitters(out), captured.out, captured.err, out


def _peaks(n, size=40, seed=0, base=10.0):
    """(n, size, size) frames of ``base`` with one 500 px peak each, at random places."""
    rng = np.random.default_rng(seed)
    frames = np.full((n, size, size), base)
    for t in range(n):
        frames[t, rng.integers(3, size - 3), rng.integers(3, size - 3)] += 500.0
    return frames


def _same(a, b):
    return torch.equal(a.xyz, b.xyz) and torch.equal(a.phot, b.phot) and torch.equal(a.frame_ix, b.frame_ix)


def test_a_saturated_frame_is_not_fitted_and_not_seen_by_its_neighbours(tmp_path, capsys):
    """[f0, SAT, f2] gives for frame 0 exactly what [f0] alone gives, and for frame 2 what [f2] alone gives:
    the saturated frame ends the windows as the end of a stack does."""
    folder = _model(tmp_path / "model", "WindowPeakOracle")
    f0, f2 = _peaks(2)
    sat = np.full((40, 40), 10.0)
    sat[:16] = 65535  # 40 % of the pixels at the uint16 maximum: a flash, not a bead
    em, out, err, _ = _fit(folder, np.stack([f0, sat, f2]), tmp_path, capsys)
    alone0, _, _, _ = _fit(folder, f0[None], tmp_path, capsys, name="f0")
    alone2, _, _, _ = _fit(folder, f2[None], tmp_path, capsys, name="f2")
    assert len(alone0) == 1 and len(alone2) == 1
    assert sorted(em.frame_ix.tolist()) == [0, 2]
    assert _same(em[em.frame_ix == 0], alone0)
    later = em[em.frame_ix == 2]
    later.frame_ix = later.frame_ix - 2
    assert _same(later, alone2)
    assert "1 of 3 frames are saturated (e.g. frames [1]): at least 25% of their pixels at 65535" in err
    assert "fitted 2 of 3 frames (40 x 40 px); 1 excluded: saturated [1]" in out


def test_constant_frames_in_a_burst_are_excluded_from_the_windows_too(tmp_path, capsys):
    """Three frames at 65535 (constant and saturated) in the middle: no localization on them, and the frames
    around them fitted as if the burst were the end of the stack."""
    folder = _model(tmp_path / "model", "WindowPeakOracle")
    frames = _peaks(8, seed=1)
    frames[3:6] = 65535
    em, out, err, _ = _fit(folder, frames, tmp_path, capsys)
    before, _, _, _ = _fit(folder, frames[:3], tmp_path, capsys, name="before")
    after, _, _, _ = _fit(folder, frames[6:], tmp_path, capsys, name="after")
    assert set(em.frame_ix.tolist()) == {0, 1, 2, 6, 7}  # a window shows its neighbours' peaks too
    assert _same(em[em.frame_ix < 3], before)
    after.frame_ix = after.frame_ix + 6
    assert _same(em[em.frame_ix > 5], after)
    assert "3 of 8 frames are saturated" in err and "frames [3, 4, 5]" in err


def test_no_localization_outside_the_frame_or_the_trained_z_range(tmp_path, capsys):
    folder = _model(tmp_path / "model", "JunkOracle")
    frames = np.random.default_rng(0).normal(100, 5, (4, 20, 24)).clip(0)
    em, out, err, path = _fit(folder, frames, tmp_path, capsys, dtype=np.float32, suffix="h5")
    assert len(em) == 12  # the three cells inside, on each of 4 frames
    assert bool((em.xyz[:, 0] >= -0.5).all() and (em.xyz[:, 0] < 19.5).all())
    assert bool((em.xyz[:, 1] >= -0.5).all() and (em.xyz[:, 1] < 23.5).all())
    assert bool((em.xyz[:, 2].abs() <= 750 + 300).all())
    assert sorted(em.xyz[:, 2].tolist()) == pytest.approx([-450.0] * 4 + [0.0] * 4 + [800.0] * 4, abs=1e-3)
    assert "dropped 12 localizations (8 outside the frame, 4 outside the trained z range)" in out
    from decode_var.data.emitter_io import load_source_meta

    meta = load_source_meta(path)
    assert meta["dropped_outside_frame"] == 8 and meta["dropped_outside_z"] == 4


def test_frames_below_the_baseline_warn_with_the_numbers_and_give_no_localizations(tmp_path, capsys):
    """Camera.baseline 100 ADU, four of six frames at 60 ADU (negative photons): excluded, and a warning
    with the share of pixels below the baseline and the median ADU."""
    folder = _model(tmp_path / "model", "PeakOracle", convert2photons=True, baseline=100.0)
    frames = _peaks(6, seed=2, base=0.0) + np.random.default_rng(3).integers(0, 3, (6, 40, 40))
    frames[:4] += 60.0
    frames[4:] += 200.0
    em, out, err, _ = _fit(folder, frames, tmp_path, capsys, dtype=np.float32)
    assert sorted(em.frame_ix.tolist()) == [4, 5]
    assert "4 of 6 frames are below the camera baseline" in err and "frames [0, 1, 2, 3]" in err
    assert "67% of the pixels" in err and "the frames' median is 61 ADU, Camera.baseline is 100 ADU" in err
    assert "Set Camera.baseline to the camera's offset" in err


@pytest.mark.parametrize("suffix", ["h5", "csv", "pt"])
def test_a_movie_saved_frame_by_frame_is_fitted_whole_and_the_frames_are_recorded(tmp_path, capsys, suffix):
    folder = _model(tmp_path / "model", "PeakOracle")
    frames = _peaks(20, seed=4).astype(np.uint16)
    stack = tmp_path / "movie.tif"
    for f in frames:
        tifffile.imwrite(stack, f, append=True)  # one TIFF series per frame
    em, out, err, path = _fit(folder, stack, tmp_path, capsys, suffix=suffix)
    assert sorted(em.frame_ix.tolist()) == list(range(20))
    assert f"fitted 20 of 20 frames (40 x 40 px); wrote 20 emitters to {path}" in out
    from decode_var.data.emitter_io import load_source_meta

    meta = load_source_meta(path)
    assert meta["n_frames"] == 20 and meta["frame_shape"] == [40, 40] and meta["n_frames_fitted"] == 20
    assert meta["frames_file"] == str(stack) and meta["frame_dtype"] == "uint16"
    assert meta["excluded_saturated"] == [] and meta["dropped_outside_frame"] == 0
