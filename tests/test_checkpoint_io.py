"""Checkpoint I/O that does not grow with the model more than it must: a save never reads back
the file it wrote (its SHA-256 is computed while writing), and the next save does not hash the
checkpoints already kept."""

from __future__ import annotations

from helpers import run_fresh

# Counts, with an audit hook, every open of a checkpoint file for reading while training saves.
SCRIPT = r"""
import json, sys
from helpers import make_data, make_estimator
reads = []

def audit(event, args):
    if event == "open" and "model.ckpt-" in str(args[0]):
        mode = args[1] if isinstance(args[1], str) else ("r" if not args[2] & 0o3 else "w")
        if "r" in mode and "+" not in mode:
            reads.append(str(args[0]).rsplit("/", 1)[-1])

sys.addaudithook(audit)
estimator = make_estimator(sys.argv[1], iterations_per_loop=2, save_checkpoints_steps=2,
                           keep_checkpoint_max=2)
estimator.train(lambda params: make_data(64), steps=8)  # writes 2, 4, 6, 8; deletes 2, 4
while_saving = list(reads)
estimator.train(lambda params: make_data(64), steps=2)  # restores 8, writes 10
print(json.dumps({"while_saving": while_saving, "restore_and_save": reads[len(while_saving):]}))
"""


def test_saving_reads_no_checkpoint_and_restoring_reads_one_once(tmp_path):
    outcome = run_fresh(SCRIPT, tmp_path)
    assert outcome["while_saving"] == []
    # the restore maps the file it resumes from (hashed when this process wrote it); the save
    # that follows reads nothing
    assert outcome["restore_and_save"] == ["model.ckpt-8.pt"]
