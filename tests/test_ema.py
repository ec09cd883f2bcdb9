"""The weights' moving average (``VAR.train.ema``): its arithmetic, that evaluation and model.pt use it while
training uses the raw weights, and that a resumed run keeps it exactly."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decode_var.core.errors import ParamError
from decode_var.training.checkpoint import model_state
from decode_var.training.ema import WeightAverage
from decode_var.train import train

from test_train import TINY, write_param


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    net.register_buffer("sigma_scale", torch.ones(4))
    return net


@settings(max_examples=25, deadline=None)
@given(decay=st.floats(0.5, 0.999), values=st.lists(st.floats(-10, 10), min_size=1, max_size=30))
def test_the_average_is_the_warmed_up_exponential_average(decay, values):
    net = _net()
    w = net[0].weight
    avg = float(w[0, 0].detach())
    ema = WeightAverage(net, decay)
    for t, v in enumerate(values):
        with torch.no_grad():
            w.fill_(v)
        ema.update(net)
        d = min(decay, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * v
    assert float(ema.shadow["0.weight"][0, 0]) == pytest.approx(avg, rel=1e-5, abs=1e-5)
    assert "1.num_batches_tracked" not in ema.shadow and "sigma_scale" not in ema.shadow  # counters, factors


def test_applied_puts_the_average_in_place_and_takes_it_out_again():
    net = _net()
    ema = WeightAverage(net, 0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net.sigma_scale.fill_(2.0)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.applied(net) as m:
        assert torch.equal(m[0].weight, ema.shadow["0.weight"]) and not torch.equal(m[0].weight, raw["0.weight"])
        m.sigma_scale.fill_(3.0)  # set inside (the sigma calibration): kept
    after = net.state_dict()
    assert torch.equal(after["0.weight"], raw["0.weight"]) and torch.equal(after["1.running_mean"],
                                                                        raw["1.running_mean"])
    assert torch.equal(net.sigma_scale, torch.full((4,), 3.0))


def test_a_decay_outside_0_1_is_refused(tmp_path):
    with pytest.raises(ValueError, match="VAR.train.ema"):
        WeightAverage(_net(), 1.0)
    with pytest.raises(ParamError, match="VAR.train.ema"):
        train(write_param(tmp_path, VAR={**TINY["VAR"], "train": {"plot": False, "ema": 1.5}}), progress=False)


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _run(path, **kw):
    return train(path, progress=False, **kw)


def test_model_pt_holds_the_average_and_a_resumed_run_continues_it_exactly(tmp_path):
    var = {**TINY["VAR"], "train": {"plot": False, "ema": 0.9}}
    hp = {**TINY["HyperParameter"], "epochs": 4}
    straight = _run(write_param(tmp_path / "a", HyperParameter=hp, VAR=var), log_comment="straight")
    saved, raw = model_state(straight.exp_dir / "model.pt"), model_state(straight.exp_dir / "ckpt.pt")
    averaged = [k for k in straight.ema.shadow]
    assert all(torch.equal(saved[k], straight.ema.shadow[k]) for k in averaged)
    assert any(not torch.equal(saved[k], raw[k]) for k in averaged)  # model.pt is not the raw weights
    assert all(torch.equal(raw[k], v) for k, v in straight.model.state_dict().items()
               if isinstance(v, torch.Tensor))  # training goes on with the raw weights
    # evaluation scored the averaged weights: evaluating them again gives the last epoch's fixed-definition loss
    fixed = straight.history[-1]["metrics"]["loss_fixed"]
    assert straight.evaluate()[2]["loss_fixed"] == fixed
    ema, straight.ema = straight.ema, None
    assert straight.evaluate()[2]["loss_fixed"] != fixed  # the raw weights score otherwise
    straight.ema = ema

    first = _run(write_param(tmp_path / "b", HyperParameter=hp, VAR=var), log_comment="half",
                 overrides={"HyperParameter": {"epochs": 2}})
    resumed = _run(first.exp_dir / "param_run.yaml", overrides={
        "InOut": {"checkpoint_init": str(first.exp_dir / "ckpt.pt")}, "HyperParameter": {"epochs": 4}})
    assert resumed.epoch == 4 and resumed.ema.steps == straight.ema.steps
    a, b = model_state(straight.exp_dir / "model.pt"), model_state(resumed.exp_dir / "model.pt")
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    strip = [[{k: v for k, v in e.items() if k != "seconds"} for e in r.history] for r in (straight, resumed)]
    assert json.dumps(strip[0]) == json.dumps(strip[1])


def test_without_it_model_pt_is_the_trained_weights(tmp_path):
    run = _run(write_param(tmp_path, VAR={**TINY["VAR"], "train": {"plot": False, "ema": 0}}), log_comment="off")
    assert run.ema is None
    a, b = model_state(run.exp_dir / "model.pt"), model_state(run.exp_dir / "ckpt.pt")
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
