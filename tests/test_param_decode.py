"""DECODE's way still works (issue 23): ``parse(param)`` with a param loaded by DECODE's own ``load_params``.

DECODE 0.10.2 loads a param file with ``decode.utils.param_io.load_params``: ``yaml.safe_load``, then every
key of its own reference.yaml that the file lacks is filled in (``autofill_dict``), then the dict becomes a
``RecursiveNamespace`` (``decode/utils/types.py``): a ``SimpleNamespace`` built recursively, with ``keys()``
and ``to_dict()`` but no ``get()``. DECODE is not installed everywhere, so :class:`DecodeNamespace` and
:func:`decode_load_params` below behave the same way; the ``decode``-marked test uses the real one.
"""
from types import SimpleNamespace

import pytest
import torch
import yaml

from decode_var.config.param import Param, as_param, load_param
from decode_var.core.errors import ParamError
from decode_var.nn.loss import AdaptivePPXYZBLoss, PPXYZBLoss
from decode_var.nn.model import VARMultiScale


class DecodeNamespace(SimpleNamespace):
    """Behaves as DECODE 0.10.2's ``RecursiveNamespace``: nested dicts (also inside lists) become namespaces."""

    def __init__(self, **entries):
        super().__init__(**{k: self._wrap(v) for k, v in entries.items()})

    @classmethod
    def _wrap(cls, value):
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (list, tuple)):
            return [cls._wrap(v) for v in value]
        return value

    def keys(self):
        return self.__dict__.keys()

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, DecodeNamespace) else v for k, v in self.__dict__.items()}


#: The part of DECODE 0.10.2's reference.yaml that matters here: its defaults where ours differ, and the
#: required values it leaves empty (``Camera.baseline:``), which a DECODE-loaded param then holds as None.
DECODE_REFERENCE_EXCERPT = """
CameraPreset:
Camera: {baseline: , convert2photons: true, e_per_adu: , em_gain: , px_size: , qe: 1.0, read_sigma: , spur_noise: }
Hardware: {device: 'cuda:0', device_simulation: 'cuda:0', num_worker_train: 4, torch_threads: 4,
           torch_multiprocessing_sharing_strategy: }
HyperParameter:
  arch_param: {activation: ELU, depth: , depth_shared: 2, initial_features: 48, norm: , pool_mode: StrideConv}
  architecture: SigmaMUNet
  auto_restart_param: {num_restarts: 5, restart_treshold: 100}
  batch_size: 64
  channels_out:
  chweight_stat: [1.0, 1.0]
  grad_mod: true
  loss_impl: MixtureModel
  learning_rate_scheduler: StepLR
  learning_rate_scheduler_param: {step_size: 10, gamma: 0.9}
  opt_param: {lr: 0.0002, weight_decay: 0.1}
  photon_threshold:
  pseudo_ds_size: 10000
InOut: {calibration_file: , experiment_out: , checkpoint_init: , model_init: }
Scaling: {input_scale: , input_offset: , bg_max: , phot_max: , z_max: }
Simulation: {bg_uniform: , density: , emitter_av: 20, intensity_mu_sig: , intensity_th: , lifetime_avg: ,
             photon_range: }
TestSet: {mode: simulated, test_size: 512}
"""

#: A DECODE-format param file for decode-var's model and loss, without a VAR section.
DECODE_FORMAT = """
Camera: {baseline: 100.0, e_per_adu: 45.0, em_gain: 100.0, px_size: [100.0, 100.0], read_sigma: 74.4,
         spur_noise: 0.0015}
HyperParameter: {architecture: VARMultiScale, loss_impl: AdaptivePPXYZB, channels_in: 3, pseudo_ds_size: 512}
InOut: {experiment_out: out}
Simulation:
  bg_uniform: [20.0, 200.0]
  emitter_av: 6.0
  emitter_extent: [[-0.5, 15.5], [-0.5, 15.5], [-750.0, 750.0]]
  img_size: [16, 16]
  intensity_mu_sig: [7000.0, 3000.0]
  lifetime_avg: 1.0
  psf_extent: [[-0.5, 15.5], [-0.5, 15.5], null]
TestSet: {img_size: [16, 16], frame_extent: [[-0.5, 15.5], [-0.5, 15.5], null]}
"""

VAR_SECTION = """
VAR:
  scales: [0.5, 1.0]
  seed: 3
  model: {features: 8, token_dim: 16, depth: 1, heads: 2, window: 4}
  teacher_forcing: {start: 0.5, end: 0.0, epochs: 4}
  loss: {adaptive: false, channel_weights: balanced, pos_weight: 3.0, scale_schedule: none}
"""


def _autofill(user: dict, reference: dict) -> dict:
    """DECODE's ``autofill_dict``: the reference's keys the user lacks, recursively; the user's others kept."""
    out = dict(user)
    for key, ref in reference.items():
        if isinstance(ref, dict):
            out[key] = _autofill(user.get(key) or {}, ref)
        elif key not in user:
            out[key] = ref
    return out


def decode_load_params(path) -> DecodeNamespace:
    """What ``decode.utils.param_io.load_params(path)`` returns, with DECODE's reference cut to the excerpt."""
    data = yaml.safe_load(path.read_text())
    return DecodeNamespace(**_autofill(data, yaml.safe_load(DECODE_REFERENCE_EXCERPT)))


def _loss_config(crit) -> dict:
    return {"type": type(crit).__name__, "state": crit.state_dict(), "pos_weight": crit.pos_weight,
            "xyz_loss": crit.xyz_loss, "smooth_l1_beta": crit.smooth_l1_beta, "factors": crit.factors,
            "scale_balance": crit.scale_balance, "n_scales": crit.n_scales,
            "adaptive": crit.adaptive.config() if hasattr(crit, "adaptive") else None}


def _model(param) -> VARMultiScale:
    torch.manual_seed(0)  # the weights' init draws from the global RNG
    return VARMultiScale.parse(param)


def _same_model(theirs, ours) -> None:
    a, b = _model(theirs), _model(ours)
    assert a.schedule.factors == b.schedule.factors and a.conditioning == b.conditioning
    assert a.tf_schedule == b.tf_schedule
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:  # the same weights, not only the same shapes (p_init and widths come from the param)
        same = sa[k] == sb[k] if k == "_extra_state" else sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k])
        assert same, k


@pytest.fixture(params=["without VAR", "with VAR"])
def decode_file(request, tmp_path):
    f = tmp_path / "param.yaml"
    f.write_text(DECODE_FORMAT + (VAR_SECTION if request.param == "with VAR" else ""))
    return f


def test_model_and_losses_parse_a_param_loaded_by_decodes_load_params(decode_file):
    theirs, ours = decode_load_params(decode_file), load_param(decode_file)
    assert not hasattr(theirs, "get") and theirs.Camera.read_sigma == 74.4 and theirs.Hardware.device == "cuda:0"
    _same_model(theirs, ours)
    for loss in (AdaptivePPXYZBLoss, PPXYZBLoss):
        assert _loss_config(loss.parse(theirs)) == _loss_config(loss.parse(ours)), loss
    n_scales = 3 if not hasattr(theirs, "VAR") else 2
    assert VARMultiScale.parse(theirs).schedule.factors == ((0.25, 0.5, 1.0) if n_scales == 3 else (0.5, 1.0))
    assert AdaptivePPXYZBLoss.parse(theirs).n_scales == n_scales


def test_decodes_empty_placeholders_get_our_defaults_but_an_empty_choice_is_kept(tmp_path):
    f = tmp_path / "param.yaml"
    f.write_text("Simulation: {emitter_av: 6.0, intensity_mu_sig: [5000.0, 1000.0]}\nPostProcessing:\n")
    p = as_param(decode_load_params(f))
    assert p.Camera.read_sigma == 74.4 and p.InOut.experiment_out == "out"  # DECODE leaves these empty
    assert p.Camera.em_gain is None and p.PostProcessing is None  # empty means sCMOS / no post-processing
    assert p.Hardware.device == "cuda:0" and p.HyperParameter.auto_restart_param.num_restarts == 5  # DECODE's kept
    assert p.Scaling.phot_max == 13000.0 and p.VAR.scales == [0.25, 0.5, 1.0]


def test_as_param_keeps_a_loaded_param_and_refuses_what_is_no_param(tmp_path):
    f = tmp_path / "param.yaml"
    f.write_text(DECODE_FORMAT)
    ours = load_param(f)
    assert as_param(ours) is ours
    assert isinstance(as_param({"VAR": {"scales": [1.0]}}), Param)
    with pytest.raises(ParamError, match="got int"):
        VARMultiScale.parse(42)
    with pytest.raises(ParamError, match=r"Unknown key VAR.scale. Did you mean 'scales'"):
        AdaptivePPXYZBLoss.parse(DecodeNamespace(VAR={"scale": [1.0]}))


@pytest.mark.decode
def test_real_decode_load_params(decode_file):
    from decode.utils.param_io import load_params

    theirs, ours = load_params(str(decode_file)), load_param(decode_file)
    assert type(theirs).__name__ == "RecursiveNamespace"
    _same_model(theirs, ours)
    for loss in (AdaptivePPXYZBLoss, PPXYZBLoss):
        assert _loss_config(loss.parse(theirs)) == _loss_config(loss.parse(ours)), loss
