"""Seeding (lmbook.core.seeding)."""


import pytest
import torch

from lmbook import ParameterError
from lmbook.core.seeding import set_seed


def test_set_seed_is_reproducible():
    set_seed(3)
    a = torch.rand(3)
    set_seed(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ParameterError):
        set_seed(-1)
