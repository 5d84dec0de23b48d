"""test_random_input_resume.py's SIGKILL fuzz with training replayed
(TPUConfig(replay_training=True)): random input draws, killed at random moments, restarted, bit
for bit."""

from __future__ import annotations

from test_random_input_resume import sigkills_then_a_restart_end_bit_for_bit


def test_sigkills_at_random_moments_then_a_restart_end_bit_for_bit_replayed(tmp_path):
    # 5 kills (issue 23's layouts take 10), each at most ~16 steps on: the end (90) stays ahead
    sigkills_then_a_restart_end_bit_for_bit(tmp_path, "xla_replay", kills=5, steps=90)
