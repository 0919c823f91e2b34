"""Seeding every random number generator a chapter uses. Introduced in chapter 1."""

import random

import numpy as np
import torch

from lmbook.core.params import check_int

__all__ = ["set_seed"]


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    check_int("SEED", seed, 0, 2**32 - 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
