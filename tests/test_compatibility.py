"""What 0.2.0 wrote still loads: a model_dir with a checkpoint (Adam, an LR schedule, an EMA), an
export of it, and a sharded (FSDPv2, 4 devices) checkpoint, all written by torch_tpu_estimator
0.2.0 (commit 7a614c4) into tests/fixtures/v0_2, with the predictions and the evaluation 0.2.0
gave on them (expected_0.2.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import adam_with_schedule, make_data, make_estimator

from torch_tpu_estimator import UpdateConfig, load_exported

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v0_2")
with open(os.path.join(FIXTURES, "expected_0.2.json")) as handle:
    EXPECTED = json.load(handle)


@pytest.fixture
def copied(tmp_path):
    """The fixtures in a folder of the test's own (reading a checkpoint may record things)."""
    shutil.copytree(FIXTURES, tmp_path / "v0_2")
    return tmp_path / "v0_2"


def _estimator(model_dir):
    return make_estimator(model_dir, optimizer_fn=adam_with_schedule, dropout=0.2,
                          update_config=UpdateConfig(ema_decay=0.9))


def test_a_0_2_checkpoint_predicts_as_0_2_did_and_resumes(copied):
    estimator = _estimator(copied / "model_dir")
    logits = torch.stack([prediction["logits"] for prediction in estimator.predict(
        lambda params: make_data(8, seed=EXPECTED["features_seed"]))])
    assert torch.equal(logits, torch.tensor(EXPECTED["predict_logits"]))
    estimator.train(lambda params: make_data(64), steps=2)  # optimizer, schedule, EMA, input
    assert estimator.latest_checkpoint().endswith("model.ckpt-8.pt")


def test_a_0_2_export_serves_as_0_2_did(copied):
    served = load_exported(copied / "export_base")(
        make_data(8, seed=EXPECTED["features_seed"]).tensors[0])
    assert torch.equal(served["logits"], torch.tensor(EXPECTED["served_logits"]))


def test_a_0_2_sharded_checkpoint_evaluates_on_one_device_as_0_2_did(copied):
    results = make_estimator(copied / "sharded_model_dir", optimizer_fn=adam_with_schedule
                             ).evaluate(lambda params: make_data(16, seed=EXPECTED["features_seed"]))
    assert results == EXPECTED["sharded_eval_on_one_device"]


@pytest.mark.parametrize("path", ["model_dir", "export_base", "sharded_model_dir"])
def test_inspect_reads_what_0_2_wrote(copied, path):
    inspected = subprocess.run([sys.executable, "-m", "torch_tpu_estimator", "inspect",
                                str(copied / path)], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    assert "layers.0.weight" in inspected.stdout
