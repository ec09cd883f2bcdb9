"""Tasks ask models and losses for capabilities, never for their type: a plugin's model trains without
them, and one that has them is treated as VARMultiScale is."""
import json
import math

import pytest
import torch

from decode_var import registry
from decode_var.backend import get_backend
from decode_var.config.param import load_param
from decode_var.train import train
from decode_var.training.tasks import make_task, scale_factors

from test_train import TINY, write_param


class PlainSixChannelNet(torch.nn.Module):
    """A plugin's model as DECODE's are: ``forward(frames)``, (N, 6, H, W) on the frame's grid, p as logits in
    training and through a sigmoid in eval; no ``progressive``, ``set_epoch``, ``predicted_factors``."""

    built: list = []

    def __init__(self, channels_in: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels_in, 6, 3, padding=1)

    @classmethod
    def parse(cls, param):
        model = cls(int(param.HyperParameter.channels_in))
        cls.built.append((model, [p.detach().clone() for p in model.parameters()]))
        return model

    def forward(self, frames_NCHW):
        out = self.conv(frames_NCHW)
        return out if self.training else torch.cat([torch.sigmoid(out[:, :1]), out[:, 1:]], 1)


def test_a_model_without_capabilities_trains_through_the_six_channel_task(tmp_path, monkeypatch):
    registry.list_models()  # loaded first, so that the copy below holds every provider's entries
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    monkeypatch.setattr(PlainSixChannelNet, "built", [])
    registry.register_model("PlainSixChannelNet")(PlainSixChannelNet)
    p = write_param(tmp_path, HyperParameter={**TINY["HyperParameter"], "epochs": 1,
                                              "architecture": "PlainSixChannelNet"},
                    VAR={**TINY["VAR"], "scales": [1.0]})
    trainer = train(p, log_comment="plain", progress=False)
    (model, initial), = PlainSixChannelNet.built
    assert trainer.model is model and trainer.epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))  # the optimiser stepped
    entry, = json.loads((trainer.exp_dir / "history.json").read_text())
    assert entry["skipped_batches"] == 0 and math.isfinite(entry["train_loss"]) and math.isfinite(entry["test_loss"])
    assert entry["teacher_forcing"] == 0.0 and entry["active_scales"] == 1
    # the loss saw the model's one map as scale 0 (its per-scale breakdown is the whole loss)
    assert entry["components"]["s0"] == pytest.approx(entry["test_loss"], rel=1e-6)


class DuckProgressive(torch.nn.Module):
    """Not a VARMultiScale, but with its capabilities: two scales (0.5, 1), teacher forcing that falls by
    0.25 per epoch, coins it records."""

    progressive = True

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.teacher_forcing, self.coins, self.calls = 1.0, [], []

    def predicted_factors(self):
        return [0.5, 1.0]

    def set_epoch(self, epoch):
        self.teacher_forcing = 1.0 - 0.25 * epoch

    def seed_coins(self, seed):
        self.coins.append(seed)

    def forward(self, frames_NCHW, targets=None, n_active=None):
        self.calls.append((len(targets), n_active, self.teacher_forcing))
        full = self.conv(frames_NCHW)
        return [torch.nn.functional.avg_pool2d(full, 2), full][:n_active]


def test_the_task_asks_capabilities_not_types(tmp_path):
    param = load_param(write_param(tmp_path))  # VAR.scales 0.25, 0.5, 1
    model = DuckProgressive()
    loss = registry.get_loss(param.HyperParameter.loss_impl).parse(param, factors=scale_factors(param, model))
    task = make_task(param, get_backend("builtin"), model, loss)
    assert task.schedule.factors == (0.5, 1.0) and loss.n_scales == 2  # VAR.scales as the model predicts them
    assert task.start_epoch(2) == 0.5  # the model's own schedule, read back
    task.seed_step(1234)
    assert model.coins == [1234]
    frames = torch.rand(2, 3, 16, 16)
    targets = [torch.zeros(2, 6, 8, 8), torch.zeros(2, 6, 16, 16)]
    weights = [torch.ones(2, 6, 8, 8), torch.ones(2, 6, 16, 16)]
    with task.test_loss_mode():
        loss_val, out = task.train_forward(frames, (targets, weights))
    assert model.teacher_forcing == 0.5  # restored after the test loss
    assert model.calls == [(2, 2, 0.0)]  # both scales' targets, teacher forcing off
    assert len(out) == 2 and {"s0", "s1"} <= set(task.log(loss_val)[1])
