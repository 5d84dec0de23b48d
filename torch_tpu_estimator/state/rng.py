"""This process's random generators as a component of the run's state: Python's, NumPy's,
torch's, CUDA's and the XLA device's seed."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..runtime.base import Replica


class RngState:
    """This process's random generators: Python, NumPy, torch, CUDA and the XLA device seed."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def seed(self, seed: int) -> None:
        """Seeds every generator; the only place a run's RNGs are seeded. Every replica draws
        from the same seed, as Accelerate's set_seed and Lightning's seed_everything do:
        per-host input relies on input_fn seeing the same RNG everywhere."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.replica.set_device_rng_state(seed)

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        return {
            "python": random.getstate(),
            "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_pos": numpy_state["state"]["pos"],
            "numpy_gauss": (numpy_state["has_gauss"], numpy_state["gauss"]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "device": self.replica.get_device_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        has_gauss, gauss = state["numpy_gauss"]
        np.random.set_state({
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                      "pos": state["numpy_pos"]},
            "has_gauss": has_gauss, "gauss": gauss})
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.replica.set_device_rng_state(state["device"])
