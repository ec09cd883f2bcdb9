import pytest
from hypothesis import given, strategies as st

from decode_var.core.errors import ParamError
from decode_var.core.scales import ScaleSchedule


def test_grids_coarser_and_finer_than_input():
    s = ScaleSchedule((40, 40), [0.25, 0.5, 1.0, 2.0])
    assert [sc.img_shape for sc in s] == [(10, 10), (20, 20), (40, 40), (80, 80)]
    assert s.finest.cell_size == (0.5, 0.5)
    assert s.coarsest.cell_size == (4.0, 4.0)
    assert all(sc.xextent == (-0.5, 39.5) for sc in s)
    assert s.index_of_factor(1.0) == 2


def test_non_square_frames():
    s = ScaleSchedule((40, 64), [0.5, 1.0])
    assert s[0].img_shape == (20, 32)


@pytest.mark.parametrize("factors,match", [
    ([0.3, 1.0], "does not fit"),  # 0.3 * 40 = 12 ok, but 0.3 * 64 = 19.2 cells
    ([1.0, 0.5], "strictly increasing"),
    ([], "empty"),
    ([-1.0], "positive"),
    (["big"], "positive"),
])
def test_bad_schedules_name_the_problem(factors, match):
    with pytest.raises(ParamError, match=match):
        ScaleSchedule((40, 64), factors)


@given(size=st.integers(4, 256), k=st.integers(0, 4))
def test_power_of_two_factors_fit_when_divisible(size, k):
    f = 2.0 ** -k
    if size % (2 ** k) == 0:
        assert ScaleSchedule((size, size), [f]).finest.img_shape == (size // 2 ** k,) * 2
    else:
        with pytest.raises(ParamError):
            ScaleSchedule((size, size), [f])
