"""decode-var-fit on frames of any size: the frame size comes from the stack, never from the param.

Two models:

- a *peak oracle* (registered below): a local-maximum finder with a 3 x 3 centroid, exact on the
  two-pixel patterns the tests draw. It makes the whole fitting chain (geometry per frame size,
  offsets, post-processing, file output) checkable to float precision on frames of any size;
- a small VARMultiScale trained on 40 x 40 px frames, fitted on 40 x 40, 64 x 96, 256 x 256 and
  18 x 18 px stacks, and compared on a large frame with the same frame cut into training-size tiles.
"""
import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from decode_var.data.emitter_io import load_emitters
from decode_var.fit import main as fit_main
from decode_var.inference.predictor import Predictor
from decode_var.config.param import load_param, param_from_dict, save_param
from decode_var.registry import register_model
from decode_var.data.simulation import Simulator

from test_train import TINY, write_param

TRAIN = 40  # px, training frame size of the small VARMultiScale (attention windows of 20 px)


@register_model("PeakOracle")
class PeakOracle(torch.nn.Module):
    """Eval-mode output (N, 6, H, W) in network units: p = 1 on local maxima of the centre frame above
    half its maximum, x / y = 3 x 3 intensity centroid relative to that pixel (px = cells of the 1x grid)."""

    def __init__(self, channels_in: int):
        super().__init__()
        self.channels_in = channels_in

    @classmethod
    def parse(cls, param):
        return cls(int(param.HyperParameter.channels_in))

    def forward(self, frames_NCHW):
        img = frames_NCHW[:, self.channels_in // 2: self.channels_in // 2 + 1]
        img = img - img.flatten(1).median(1).values[:, None, None, None]
        img = img.clamp(min=0)
        peak = (img == F.max_pool2d(img, 3, 1, 1)) & (img > 0.5 * img.flatten(1).amax(1)[:, None, None, None])
        ones = torch.ones(1, 1, 3, 3)
        mass = F.conv2d(img, ones, padding=1).clamp(min=1e-12)
        dx = F.conv2d(img, torch.tensor([[-1.0] * 3, [0.0] * 3, [1.0] * 3]).view(1, 1, 3, 3), padding=1) / mass
        dy = F.conv2d(img, torch.tensor([[-1.0, 0.0, 1.0]] * 3).view(1, 1, 3, 3), padding=1) / mass
        zero = torch.zeros_like(img)
        return torch.cat([peak.float(), zero, dx, dy, zero, zero], 1)


def _oracle_dir(tmp_path):
    from decode_var.training.checkpoint import save_model

    param = load_param(write_param(tmp_path, HyperParameter={**TINY["HyperParameter"], "architecture": "PeakOracle"},
                                   Camera={"convert2photons": False}))
    save_model(tmp_path / "model.pt", PeakOracle(3))
    save_param(tmp_path / "param_run.yaml", param)
    return tmp_path


def _fit(folder, frames_THW, tmp_path, *extra):
    stack, out = tmp_path / "stack.tif", tmp_path / "em.csv"
    tifffile.imwrite(stack, frames_THW.astype(np.float32), photometric="minisblack")
    rc = fit_main(["-p", str(folder / "param_run.yaml"), "--model", str(folder / "model.pt"), "--frames", str(stack),
                   "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    return load_emitters(out)


@pytest.mark.parametrize("hw", [(256, 256), (64, 96), (96, 64), (37, 53)])
def test_an_emitter_comes_back_at_its_row_and_column(tmp_path, hw):
    """Each frame holds one emitter drawn as two adjacent pixels with weights 3 : 1, whose centroid is
    a quarter pixel from the brighter one: along the row (x, DECODE's first axis) or the column (y)."""
    folder = _oracle_dir(tmp_path / "model")
    rng = np.random.default_rng(0)
    frames, truth = np.full((5,) + hw, 10.0), []
    for t in range(5):
        r, c = int(rng.integers(2, hw[0] - 3)), int(rng.integers(2, hw[1] - 3))
        frames[t, r, c] += 300.0
        if t % 2:
            frames[t, r + 1, c] += 100.0
            truth.append((t, r + 0.25, c))
        else:
            frames[t, r, c + 1] += 100.0
            truth.append((t, r, c + 0.25))
    em = _fit(folder, frames, tmp_path)
    assert len(em) == 5 and em.xy_unit == "px"
    order = torch.argsort(em.frame_ix)
    got = torch.stack([em.frame_ix[order].double(), em.xyz[order, 0].double(), em.xyz[order, 1].double()], 1)
    torch.testing.assert_close(got, torch.tensor(truth, dtype=torch.float64), atol=1e-4, rtol=0)


def test_oracle_fit_does_not_depend_on_the_batch(tmp_path):
    folder = _oracle_dir(tmp_path / "model")
    frames = np.full((7, 40, 40), 10.0)
    for t in range(7):
        frames[t, 5 + 4 * t, 30 - 3 * t] += 500.0
    a = _fit(folder, frames, tmp_path, "--batch-size", "3")
    b = _fit(folder, frames, tmp_path, "--batch-size", "auto")
    assert len(a) == 7 and torch.equal(a.frame_ix.sort().values, torch.arange(7))
    assert torch.equal(a.xyz, b.xyz) and torch.equal(a.frame_ix, b.frame_ix)


# ------------------------------------------------------------------------- a trained VARMultiScale
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from decode_var.train import train

    tmp = tmp_path_factory.mktemp("fitframes")
    ext = [[-0.5, TRAIN - 0.5], [-0.5, TRAIN - 0.5]]
    p = write_param(tmp, Simulation={**TINY["Simulation"], "img_size": [TRAIN, TRAIN], "psf_extent": ext + [None],
                                     "emitter_extent": ext + [[-750, 750]], "emitter_av": 3.0})
    return train(p, log_comment="fitframes", progress=False).exp_dir


def _simulate(param, hw, n, seed):
    """Frames in ADU (n, H, W) at the training density per px (simulated on the next multiple of 4 px,
    which the simulator's scales need, and cropped)."""
    d = param.to_dict()
    sim_hw = [-(-s // 4) * 4 for s in hw]
    ext = [[-0.5, sim_hw[0] - 0.5], [-0.5, sim_hw[1] - 0.5]]
    d["Simulation"].update(img_size=sim_hw, psf_extent=ext + [None], emitter_extent=ext + [[-750, 750]],
                           emitter_av=param.Simulation.emitter_av * sim_hw[0] * sim_hw[1] / TRAIN ** 2)
    d["Camera"]["convert2photons"] = False
    batch = Simulator.parse(param_from_dict(d)).sample(n, seed=seed)
    return batch.frames_NCHW[:, 1, :hw[0], :hw[1]].numpy(), batch.em


@pytest.mark.parametrize("hw", [(40, 40), (64, 96), (256, 256), (18, 18), (32, 32)])
def test_a_model_trained_on_small_frames_fits_any_frame_size(small_model, tmp_path, hw):
    import yaml

    d = yaml.safe_load((small_model / "param_run.yaml").read_text())
    # a briefly trained model is unsure everywhere: every local maximum of p becomes an emitter, so the
    # geometry of every part of the frame is checked
    d["PostProcessingParam"]["raw_th"] = 1e-6
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "param_run.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "model" / "model.pt").write_bytes((small_model / "model.pt").read_bytes())
    frames, _ = _simulate(load_param(small_model / "param_run.yaml"), hw, 3, seed=5)
    em = _fit(tmp_path / "model", frames, tmp_path)
    assert set(em.frame_ix.tolist()) == {0, 1, 2}
    x, y = em.xyz[:, 0], em.xyz[:, 1]
    assert x.min() >= -1.0 and x.max() <= hw[0] and y.min() >= -1.0 and y.max() <= hw[1]
    # emitters all over the frame, not only in a training-size corner
    assert x.max() > hw[0] - 8 and y.max() > hw[1] - 8


def test_a_large_frame_equals_its_training_size_tiles_away_from_the_tile_borders(small_model):
    """Attention windows keep their training size on any frame and tile it from the origin, so a
    frame cut into training-size tiles gives the same maps as the whole frame wherever the tile
    border (zero padding in a tile, real pixels in the frame) is out of reach of the convolutions."""
    param = load_param(small_model / "param_run.yaml")
    pred = Predictor(param, small_model / "model.pt")
    frames, _ = _simulate(param, (3 * TRAIN, 3 * TRAIN), 4, seed=7)
    frames_NCHW = torch.from_numpy(frames)[:, None].expand(-1, 3, -1, -1)
    x = pred.to_network(pred.adu_to_photons(frames_NCHW))
    full = pred.maps(x)
    tiled = torch.zeros_like(full)
    for i in range(3):
        for j in range(3):
            sl = (Ellipsis, slice(i * TRAIN, (i + 1) * TRAIN), slice(j * TRAIN, (j + 1) * TRAIN))
            tiled[sl] = pred.maps(x[sl])
    d = torch.arange(3 * TRAIN) % TRAIN
    d = torch.minimum(d, TRAIN - 1 - d)
    interior = torch.minimum(d[:, None], d[None, :]) >= 8
    # p decides a detection at raw_th (0.5 in the quickstart): 0.01 leaves every decision as it is
    assert float((tiled[:, 0] - full[:, 0]).abs()[:, interior].max()) < 0.01
    # offsets where the model sees something: the top 2 % of p in the interior
    p_in = full[:, 0][:, interior]
    seen = (full[:, 0] >= p_in.quantile(0.98)) & interior
    assert float((tiled[:, 2:4] - full[:, 2:4]).abs().amax(1)[seen].max()) < 0.1
    border = torch.minimum(d[:, None], d[None, :]) == 0
    assert float((tiled - full).abs()[:, 0][:, border].max()) > 0  # the comparison sees the tiles at all


def test_attention_windows_keep_their_training_size_on_larger_frames(small_model):
    from decode_var.nn.blocks import WindowLayout

    model = Predictor(load_param(small_model / "param_run.yaml"), small_model / "model.pt").model
    assert model._win0 == (5, 5)  # a 10 x 10 coarse grid (40 px at 0.25) in 2 x 2 windows of 5 cells
    layout = WindowLayout((30, 26), [1, 2], model.window, "cpu", win0=model._win0)
    assert layout.n_w == (6, 6) and layout.window_shape(2) == (10, 10)  # 20 px windows from the origin
    # without a fixed size, windows are balanced on the grid at hand (what training frames get)
    assert WindowLayout((10, 10), [1], 8, "cpu").win0 == (5, 5)
    assert WindowLayout((30, 26), [1], 8, "cpu").win0 == (8, 7)


def test_the_batch_fits_the_memory_budget(small_model):
    pred = Predictor(load_param(small_model / "param_run.yaml"), small_model / "model.pt")
    small, large = pred.window_bytes((64, 64)), pred.window_bytes((512, 512))
    assert 50 < large / small < 80  # memory per window grows with the area (64x more pixels)
    budget = 20 * large
    n = pred.auto_batch_size((512, 512), budget)
    assert n * large <= budget < (n + 1) * large
    assert pred.auto_batch_size((512, 512), budget, n_frames=3) == 3


def test_compiled_fit_pads_the_last_batch_and_falls_back_when_compiling_fails(tmp_path, monkeypatch, capsys):
    """``--compile`` runs one fixed batch shape (the last batch padded); a compile error falls back to
    eager mode with a warning. torch.compile itself is replaced here: compiling takes minutes."""
    folder = _oracle_dir(tmp_path / "model")
    frames = np.full((7, 40, 40), 10.0)
    for t in range(7):
        frames[t, 5 + 4 * t, 30 - 3 * t] += 500.0
    eager = _fit(folder, frames, tmp_path, "--batch-size", "3")
    seen = []

    def fake_compile(model, dynamic=None):
        def run(x):
            seen.append(x.shape[0])
            return model(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = _fit(folder, frames, tmp_path, "--batch-size", "3", "--compile")
    assert seen == [3, 3, 3]  # 7 frames: 3 + 3 + (1 padded to 3)
    assert torch.equal(compiled.xyz, eager.xyz) and torch.equal(compiled.frame_ix, eager.frame_ix)

    def broken_compile(model, dynamic=None):
        def run(x):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    fallback = _fit(folder, frames, tmp_path, "--batch-size", "3", "--compile")
    assert "torch.compile failed" in capsys.readouterr().err
    assert torch.equal(fallback.xyz, eager.xyz)
