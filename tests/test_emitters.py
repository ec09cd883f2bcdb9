import pytest
import torch

from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import ShapeError


def _em():
    return EmitterSet(torch.tensor([[1.0, 2.0, 30.0], [3.0, 4.0, -50.0], [5.0, 6.0, 0.0]]),
                      torch.tensor([100.0, 200.0, 300.0]), torch.tensor([0, 1, 1]), px_size=(100.0, 50.0))


def test_units_and_subsets():
    em = _em()
    assert torch.equal(em.xyz_nm[0], torch.tensor([100.0, 100.0, 30.0]))
    sub = em.get_subset_frame(1, 1, -1)
    assert len(sub) == 2 and sub.frame_ix.tolist() == [0, 0]
    assert [len(e) for e in em.split_in_frames(0, 2)] == [1, 2, 0]
    cat = EmitterSet.cat([em, em], step_frame_ix=10)
    assert cat.frame_ix.tolist() == [0, 1, 1, 10, 11, 11]


def test_bad_shapes_are_clear():
    with pytest.raises(ShapeError, match="phot has 2 values, expected 3"):
        EmitterSet(torch.zeros(3, 3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ShapeError, match="xyz must be"):
        EmitterSet(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3))


def test_nm_conversion_needs_px_size():
    em = EmitterSet(torch.zeros(1, 3), torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="px_size"):
        em.xyz_nm
