"""The host's random generators (Python's `random`, NumPy's global one and torch's CPU one) as
the input pipeline sees them: seeded from the run seed and a position, never from whatever
state the run happens to be in.

A Dataset that draws in `__getitem__` (a random crop, noise), an input_fn that draws its data, a
generator of batches that draws per batch: each draw is made under a seed derived from
RunConfig.seed and where it happens (the call, the pass, the example's index or the batch's
position in the pass). So what a batch holds does not depend on how far ahead it was read, on
restarts, or on how many replicas share the data, and a resumed run reads exactly what an
uninterrupted one read. The run's own generators are put back as they were afterwards: the
model's random draws never see the input's.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

_MASK = (1 << 64) - 1


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) from a run seed and the names and positions of a draw: distinct
    parts give unrelated seeds (splitmix64 over the parts), the same parts the same seed on
    every process and in every Python."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        value = part if isinstance(part, int) else int.from_bytes(
            hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
        state = (state ^ (value & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK
        state ^= state >> 29
    return state >> 1


def seed_host(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's CPU generators (not CUDA's or the XLA device's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def host_generators_kept() -> Iterator[None]:
    """Puts the host generators back as they were once the block ends."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), \
        torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The block draws from the host generators seeded with `seed`; they are put back after."""
    with host_generators_kept():
        seed_host(seed)
        yield
