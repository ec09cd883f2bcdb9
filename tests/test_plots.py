"""Curves a user can read: a test loss whose definition stays fixed over the run, and report frames."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.training.trainer import Trainer
from decode_var.nn.loss import PPXYZBLoss, unit_weight_loss
from decode_var.config.param import load_param
from decode_var.evaluation.plots import plot_training_curves

from test_train import write_param


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6))
def test_unit_weight_loss_is_ppxyzb_with_unit_weights_on_probabilities(seed, n, h, w):
    """The fixed-definition loss is DECODE's PPXYZB per-element loss (pos_weight 1, unit channel weights),
    taking p as a probability (the eval output) instead of a logit, averaged per sample."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 6, h, w, generator=g, dtype=torch.float64) * 3
    target = torch.randn(n, 6, h, w, generator=g, dtype=torch.float64)
    target[:, 0] = (torch.rand(n, h, w, generator=g) < 0.3).double()
    weight = (torch.rand(n, 6, h, w, generator=g) < 0.7).double()
    ref = PPXYZBLoss(pos_weight=1.0, channel_weights=[1.0] * 6).elementwise(logits, target, weight)
    prob = torch.cat((logits[:, :1].sigmoid(), logits[:, 1:]), 1)
    got = unit_weight_loss(prob, target, weight)
    assert got.shape == (n,)
    torch.testing.assert_close(got.double(), ref.flatten(1).mean(1), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory):
    param = load_param(write_param(tmp_path_factory.mktemp("curves")))
    return Trainer(param, None, log=False, progress=False)


def test_fixed_test_loss_ignores_the_changing_scale_and_channel_weights(tiny_trainer, monkeypatch):
    tr = tiny_trainer
    rng_before = torch.random.get_rng_state()
    loss_0, _, metrics_0 = tr.evaluate()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no random draw: training stays bit for bit
    assert math.isfinite(metrics_0["loss_fixed"]) and metrics_0["loss_fixed"] > 0
    # what the optimised loss's definition does during a run: more scales, other channel weights
    tr.loss.set_epoch(50)
    monkeypatch.setattr(tr.loss, "_channel_weight_list", lambda: [5.0, 0.1, 3.0, 3.0, 0.2, 0.05])
    loss_1, _, metrics_1 = tr.evaluate()
    tr.loss.set_epoch(0)
    assert tr.loss.active_scales >= 1 and loss_1 != loss_0
    assert metrics_1["loss_fixed"] == metrics_0["loss_fixed"]


def test_fixed_test_loss_follows_the_model(tiny_trainer):
    """It measures the model: other weights give another value."""
    tr = tiny_trainer
    before = tr.evaluate()[2]["loss_fixed"]
    saved = copy.deepcopy(tr.model.state_dict())
    try:
        with torch.no_grad():
            for p in tr.model.parameters():
                p.add_(0.05)
        after = tr.evaluate()[2]["loss_fixed"]
    finally:
        tr.model.load_state_dict(saved)
    assert after != before


def test_training_curves_label_the_fixed_and_the_optimised_loss(tmp_path, monkeypatch):
    import matplotlib.figure

    labels = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        labels.extend(line.get_label() for line in fig.axes[0].get_lines())
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    entry = {"train_loss": 0.1, "test_loss": 0.2, "channel_weights": [1.0] * 6, "components": {}}
    history = [dict(entry, epoch=0, metrics={"loss_fixed": 0.5, "jac": 0.2}),
               dict(entry, epoch=1, metrics={})]  # an epoch without test evaluation
    plot_training_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert any("fixed definition" in s for s in labels)
    assert sum("optimised" in s for s in labels) == 2


def test_report_draws_the_frame_under_the_positions(tmp_path, monkeypatch):
    import matplotlib.figure

    from decode_var.core.emitters import EmitterSet
    from decode_var.evaluation.plots import plot_eval_report

    shown = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        shown.extend((np.asarray(im.get_array()), tuple(im.get_extent())) for ax in fig.axes for im in ax.get_images())
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    gt = EmitterSet(xyz=torch.tensor([[3.0, 4.0, 0.0], [5.0, 6.0, 0.0], [1.0, 1.0, 0.0]]),
                    phot=torch.tensor([1000.0, 2000.0, 3000.0]), frame_ix=torch.tensor([0, 2, 7]),
                    px_size=torch.tensor([100.0, 100.0]))
    empty = gt[gt.frame_ix < 0]
    param = load_param(write_param(tmp_path))
    asked = []

    def frame_image(f):
        asked.append(f)
        return np.full((16, 12), float(f))

    matched = (empty, empty, gt, empty)  # nothing found: every true emitter is a false negative
    plot_eval_report(tmp_path / "report.png", matched, gt, empty, frame_hw=(16, 12),
                     frame_image=frame_image, image_unit="photons")
    assert asked == [0, 2]  # only the two frames shown are asked for
    assert [img[0, 0] for img, _ in shown] == [0.0, 2.0] and all(img.shape == (16, 12) for img, _ in shown)
    assert all(ext == (-0.5, 11.5, 15.5, -0.5) for _, ext in shown)  # x down, y right, pixel i centred on i
    shown.clear()
    plot_eval_report(tmp_path / "report2.png", matched, gt, empty, frame_hw=(16, 12))
    assert shown == [] and (tmp_path / "report2.png").is_file()  # frames are optional
