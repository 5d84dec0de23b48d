"""test_random_input_resume.py's SIGKILL fuzz on plain PyTorch, one process and 2 gloo
replicas: random input draws, killed at random moments, restarted, bit for bit."""

from __future__ import annotations

import pytest
from test_random_input_resume import sigkills_then_a_restart_end_bit_for_bit


@pytest.mark.parametrize("layout", ["torch", "gloo2"])
def test_sigkills_at_random_moments_then_a_restart_end_bit_for_bit_on_torch(tmp_path, layout):
    sigkills_then_a_restart_end_bit_for_bit(tmp_path, layout)
