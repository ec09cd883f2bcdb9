"""Channel-weight presets and the adaptive rule, on synthetic per-epoch loss histories."""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decode_var.nn.channel_weights import CHANNELS, PRESETS, AdaptiveChannelWeights, resolve_channel_weights
from decode_var.core.errors import CheckpointError, ParamError


def _decaying(rate: float, start: float = 1.0):
    """Loss of a channel that shrinks by ``rate`` per epoch (rate 1: flat)."""
    return lambda epoch: start * rate ** epoch


def _run(acw: AdaptiveChannelWeights, curves, epochs: int, first_epoch: int = 0):
    for e in range(first_epoch, first_epoch + epochs):
        acw.update({ch: f(e) for ch, f in zip(CHANNELS, curves)})


# ---------------------------------------------------------------------- presets
def test_presets_are_the_documented_ones():
    assert resolve_channel_weights("balanced") == [1, 1, 1, 1, 1, 1]
    assert resolve_channel_weights("detection_focused") == [2, 1, 1, 1, 0.5, 0.5]
    assert resolve_channel_weights("localization_focused") == [1, 1, 2, 2, 2, 0.5]
    assert resolve_channel_weights("photometry_focused") == [1, 2, 1, 1, 1, 1]
    assert resolve_channel_weights("recommended") == [1.5, 1, 1.2, 1.2, 0.8, 0.8]
    assert set(PRESETS) == {"balanced", "detection_focused", "localization_focused", "photometry_focused",
                            "recommended"}


def test_explicit_list_is_taken_as_given():
    assert resolve_channel_weights([1, 0, 2.5, 2.5, 1, 0]) == [1.0, 0.0, 2.5, 2.5, 1.0, 0.0]


@pytest.mark.parametrize("spec, needle", [
    ("detection", "is not a preset"),
    ([1, 1, 1], "list of 6 numbers"),
    ([1, 1, 1, 1, 1, -1], "channel bg"),
    ([1, 1, float("nan"), 1, 1, 1], "channel x"),
    ([0, 0, 0, 0, 0, 0], "all zeros"),
    (3.0, "list of 6 numbers"),
])
def test_bad_channel_weights_name_the_key(spec, needle):
    with pytest.raises(ParamError) as err:
        resolve_channel_weights(spec)
    assert "VAR.loss.channel_weights" in str(err.value) and needle in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ParamError) as err:
        resolve_channel_weights("fancy")
    for name in PRESETS:
        assert name in str(err.value)


# ---------------------------------------------------------------------- the rule
def test_slow_channel_goes_up_fast_channel_goes_down_others_stay():
    # p flat (ratio 1 > 0.95), phot falls fast (ratio 0.5**5 < 0.8), the rest in between (0.97**5 = 0.86)
    acw = AdaptiveChannelWeights("balanced", renormalise=False)
    _run(acw, [_decaying(1.0), _decaying(0.5), *[_decaying(0.97)] * 4], 10)
    assert acw.weights == pytest.approx([1.1, 0.9, 1, 1, 1, 1])
    assert acw.n_updates == 1


def test_rule_only_fires_every_interval_epochs():
    acw = AdaptiveChannelWeights("balanced", interval=10, window=5, renormalise=False)
    curves = [_decaying(1.0)] * 6
    _run(acw, curves, 9)
    assert acw.weights == [1.0] * 6  # 9 epochs: not due yet
    _run(acw, curves, 1, first_epoch=9)
    assert acw.weights == pytest.approx([1.1] * 6)
    _run(acw, curves, 9, first_epoch=10)
    assert acw.weights == pytest.approx([1.1] * 6)
    _run(acw, curves, 1, first_epoch=19)
    assert acw.weights == pytest.approx([1.21] * 6)


def test_ratio_thresholds_are_strict_and_configurable():
    acw = AdaptiveChannelWeights("balanced", window=1, interval=2, renormalise=False, up_ratio=0.95, down_ratio=0.8)
    # ratios exactly on the thresholds change nothing; just beyond them do
    acw.update([1, 1, 1, 1, 1, 1])
    acw.update([0.95, 0.8, 0.951, 0.799, 1, 1])
    assert acw.weights == pytest.approx([1, 1, 1.1, 0.9, 1.1, 1.1])
    assert acw.ratios()[:4] == pytest.approx([0.95, 0.8, 0.951, 0.799])


def test_renormalise_keeps_the_sum_and_the_direction():
    acw = AdaptiveChannelWeights("recommended", renormalise=True)
    total = sum(acw.weights)
    _run(acw, [_decaying(1.0), _decaying(0.5), *[_decaying(0.97)] * 4], 10)
    assert sum(acw.weights) == pytest.approx(total, rel=1e-12)
    assert acw.weights[0] > 1.5 and acw.weights[1] < 1.0
    # the untouched channels shrink a little with the normalisation, by the same factor
    factors = [w / w0 for w, w0 in zip(acw.weights[2:], acw.initial[2:])]
    assert max(factors) == pytest.approx(min(factors)) and factors[0] < 1


def test_without_renormalise_the_sum_drifts():
    acw = AdaptiveChannelWeights("balanced", renormalise=False)
    _run(acw, [_decaying(1.0)] * 6, 30)
    assert sum(acw.weights) == pytest.approx(6 * 1.1 ** 3)


def test_bounds_hold_for_a_channel_that_never_improves():
    acw = AdaptiveChannelWeights("balanced", weight_min=0.5, weight_max=2.0, renormalise=False)
    _run(acw, [_decaying(1.0), _decaying(0.1), *[_decaying(0.97)] * 4], 500)
    assert acw.weights[0] == 2.0 and acw.weights[1] == 0.5


def test_renormalise_respects_bounds():
    # one channel pinned at the upper bound; the rest must absorb the normalisation within bounds
    acw = AdaptiveChannelWeights("balanced", weight_min=0.8, weight_max=1.2, renormalise=True)
    _run(acw, [_decaying(1.0), *[_decaying(0.97)] * 4, _decaying(0.5)], 300)
    assert all(0.8 <= w <= 1.2 for w in acw.weights)
    assert sum(acw.weights) == pytest.approx(6.0, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(st.floats(0, 1e6), st.just(float("nan")), st.just(float("inf"))),
                         min_size=6, max_size=6), min_size=0, max_size=60),
       st.floats(0.05, 1.0), st.floats(1.0, 5.0), st.booleans())
def test_weights_stay_finite_and_in_bounds_for_any_history(history, wmin, wmax, renorm):
    acw = AdaptiveChannelWeights("balanced", interval=2, window=1, weight_min=wmin, weight_max=wmax,
                                 renormalise=renorm)
    for row in history:
        report = acw.update(row)
        assert all(math.isfinite(v) for v in report.values())
        assert all(wmin - 1e-12 <= w <= wmax + 1e-12 for w in acw.weights)
        if renorm and 6 * wmin <= 6.0 <= 6 * wmax:
            assert sum(acw.weights) == pytest.approx(6.0, rel=1e-9)
    assert all(math.isfinite(v) for h in acw.history for v in h)


def test_nonfinite_losses_are_ignored_not_averaged():
    acw = AdaptiveChannelWeights("balanced", renormalise=False)
    bad = [float("nan"), float("inf"), -float("inf"), None, "oops"]
    for e in range(10):
        acw.update([1.0, 0.5 ** e, 1.0, 1.0, 1.0, 1.0])
        acw.update({"p": bad[e % len(bad)], "phot": float("nan"), "x": 1.0, "y": 1.0, "z": 1.0, "bg": 1.0})
    # p saw 10 finite flat values (ratio 1 -> up), phot 10 fast-falling ones (down), NaNs never counted
    assert acw.ignored[:2] == [10, 10]
    assert len(acw.history[0]) == 10 and len(acw.history[1]) == 10
    # at epoch 10 only 5 finite values each (no update); at epoch 20 the 10 finite ones decide
    assert acw.weights[:2] == pytest.approx([1.1, 0.9])


def test_switched_off_channel_stays_off():
    acw = AdaptiveChannelWeights([1, 1, 1, 1, 1, 0], weight_min=0.1, renormalise=True)
    _run(acw, [_decaying(1.0)] * 5 + [_decaying(0.5)], 50)
    assert acw.weights[5] == 0.0
    assert sum(acw.weights) == pytest.approx(5.0)


def test_zero_earlier_window_leaves_the_weight_alone():
    acw = AdaptiveChannelWeights("balanced", renormalise=False)
    _run(acw, [lambda e: 0.0] + [_decaying(0.97)] * 5, 10)
    assert acw.weights == [1.0] * 6


def test_disabled_rule_records_but_never_changes():
    acw = AdaptiveChannelWeights("recommended", enabled=False)
    _run(acw, [_decaying(1.0), _decaying(0.5)] + [_decaying(0.97)] * 4, 40)
    assert acw.weights == list(PRESETS["recommended"]) and acw.epoch == 40 and len(acw.history[0]) == 40


def test_report_every_epoch_has_all_channels():
    acw = AdaptiveChannelWeights("recommended")
    report = acw.update([1.0] * 6)
    assert report == {**{f"chw_{ch}": w for ch, w in zip(CHANNELS, PRESETS["recommended"])}, "chw_changed": 0.0}


@pytest.mark.parametrize("kwargs, key", [
    ({"interval": 0}, "adaptive_interval"), ({"window": 1.5}, "adaptive_window"),
    ({"up_ratio": 0.5, "down_ratio": 0.8}, "adaptive_down_ratio"), ({"up": 0.9}, "adaptive_up"),
    ({"down": 1.2}, "adaptive_down"), ({"down": 0}, "adaptive_down"), ({"weight_min": -1}, "weight_min"),
    ({"weight_min": 3, "weight_max": 2}, "weight_min"), ({"weight_max": float("inf")}, "weight_max"),
    ({"renormalise": "yes"}, "renormalise"), ({"initial": "balanced", "weight_max": 0.5}, "channel_weights"),
])
def test_bad_settings_raise_param_error_naming_the_key(kwargs, key):
    with pytest.raises(ParamError, match=f"VAR.loss.{key}"):
        AdaptiveChannelWeights(**kwargs)


# ---------------------------------------------------------------------- state
def test_state_round_trip_continues_exactly():
    curves = [_decaying(1.0), _decaying(0.5), _decaying(0.9), _decaying(0.99), _decaying(0.7), _decaying(0.97)]
    straight = AdaptiveChannelWeights("recommended")
    _run(straight, curves, 57)

    first = AdaptiveChannelWeights("recommended")
    _run(first, curves, 23)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = AdaptiveChannelWeights("recommended")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _run(resumed, curves, 34, first_epoch=23)

    assert resumed.weights == straight.weights  # bit for bit
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.n_updates > 0


def test_state_is_plain_python():
    acw = AdaptiveChannelWeights()
    _run(acw, [_decaying(0.9)] * 6, 12)

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (int, float, bool, str)) or x is None

    assert plain(acw.state_dict())


@pytest.mark.parametrize("state", [
    {}, {"weights": [1] * 5, "history": [[]] * 6, "epoch": 0},
    {"weights": [1] * 6, "history": [[float("nan")]] * 6, "epoch": 1},
    {"weights": ["a"] * 6, "history": [[]] * 6, "epoch": 0},
])
def test_malformed_state_raises_checkpoint_error(state):
    with pytest.raises(CheckpointError):
        AdaptiveChannelWeights().load_state_dict(state)
