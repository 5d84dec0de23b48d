"""What a user sees: every Python block of the README runs as written; progress shows without
configuring logging, and logging configured after the first train still shows it; a progress
display that counts the right totals and reads nothing from the device; the run's params and
RunConfig on disk and in TensorBoard; a help that does not wait for torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import make_data, make_estimator, run_fresh
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)


def test_the_readme_has_python_blocks_to_run():
    assert len(BLOCKS) >= 1  # the front page's example; the docs' pages: test_docs.py


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{index}" for index in range(len(BLOCKS))])
def test_every_readme_python_block_runs_as_written(tmp_path, block):
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1"))
    assert done.returncode == 0, done.stderr[-3000:]


LOGGING = r"""
import logging, sys
from helpers import make_data, make_estimator
estimator = make_estimator(sys.argv[1], log_step_count_steps=2, iterations_per_loop=2,
                           progress="off")
estimator.train(lambda params: make_data(32), steps=2)     # imports torch_xla on the way
print("--- configured", file=sys.stderr, flush=True)
logging.basicConfig(level=logging.INFO, format="USER %(name)s %(message)s")
estimator.train(lambda params: make_data(32), steps=2)
print("{}")
"""


def test_progress_shows_by_default_and_after_the_user_configures_logging(tmp_path):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", LOGGING, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stderr.split("--- configured")
    assert "INFO torch_tpu_estimator: loss = " in before  # shown with no configuration at all
    assert "USER torch_tpu_estimator loss = " in after  # the user's configuration took effect
    assert "INFO torch_tpu_estimator:" not in after  # and the library's own printer stepped back


PROGRESS = r"""
import json, sys
import torch_xla.debug.metrics as met
import torch_tpu_estimator.observability.progress as progress
from helpers import make_data, make_estimator
progress.LOG_EVERY_SECONDS = 0  # a line at every window end
lines = []
import logging
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("torch_tpu_estimator").addHandler(Keep())

def transfers():
    return met.metric_data("TransferFromDeviceTime")[0]

style = sys.argv[2]
estimator = make_estimator(sys.argv[1], iterations_per_loop=4, progress=style,
                           log_step_count_steps=None, save_summary_steps=None,
                           save_checkpoints_steps=None)
estimator.train(lambda params: make_data(64), steps=1)  # compiles; its lines are not counted
lines.clear()
before = transfers()
estimator.train(lambda params: make_data(64), steps=12)
moved = {"train": transfers() - before}
before = transfers()
estimator.evaluate(lambda params: make_data(21))
moved["eval"] = transfers() - before
before = transfers()
list(estimator.predict(lambda params: make_data(21)))
moved["predict"] = transfers() - before
print(json.dumps({"lines": [line for line in lines if ": step " in line or ": example " in line],
                  "transfers": moved}))
"""


@pytest.fixture(scope="module")
def without_progress(tmp_path_factory):
    return run_fresh(PROGRESS, tmp_path_factory.mktemp("off"), "off")


def test_progress_lines_count_the_right_totals_and_read_nothing_more(tmp_path, without_progress):
    shown = run_fresh(PROGRESS, tmp_path, "log")
    assert without_progress["lines"] == []
    assert shown["transfers"] == without_progress["transfers"]  # windows and the checkpoint
    train = [line for line in shown["lines"] if line.startswith("train:")]
    assert [line.split(",")[0] for line in train[:3]] == [
        "train: step 4 of 12 (33%)", "train: step 8 of 12 (67%)", "train: step 12 of 12 (100%)"]
    assert re.search(r"loss [\d.]+", train[0])
    for verb in ("evaluate", "predict"):
        mine = [line for line in shown["lines"] if line.startswith(verb)]
        assert mine[0].startswith(f"{verb}: example 21 of 21 (100%)"), mine  # 3 steps, 1 window
        assert mine[-1].endswith(tuple(f"done in 0:{second:02d}" for second in range(60)))


def test_the_progress_bar_counts_steps_of_the_total(tmp_path, capfd):
    estimator = make_estimator(tmp_path, iterations_per_loop=5, progress="bar")
    estimator.train(lambda params: make_data(64), steps=10)
    assert "10/10" in capfd.readouterr().err


def test_params_and_the_whole_run_config_are_recorded(tmp_path):
    estimator = make_estimator(tmp_path, params={"lr": 0.05, "hidden": "wide"})
    estimator.train(lambda params: make_data(32), steps=2)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["params"] == {"lr": 0.05, "hidden": "wide"}
    assert record["config"]["tpu_config"]["iterations_per_loop"] == 4
    assert record["config"]["seed"] == 0 and record["batch_sizes"]["train"] == 8
    estimator.train(lambda params: make_data(32), steps=2)  # kept as the run began
    assert json.loads((tmp_path / "run.json").read_text()) == record

    results = estimator.evaluate(lambda params: make_data(16))
    hparams = tmp_path / "eval" / "hparams"
    accumulator = EventAccumulator(str(hparams))
    accumulator.Reload()
    assert accumulator.Scalars("hparam/loss")[0].value == pytest.approx(results["loss"])
    assert "global_step" not in EventAccumulator(str(tmp_path / "eval")).Reload().Tags()["scalars"]


def test_learning_rates_of_groups_that_differ_get_a_chart_each(tmp_path):
    def two_rates(model, params):
        import torch
        return torch.optim.SGD([{"params": model.layers[0].parameters(), "lr": 0.1},
                                {"params": model.layers[3].parameters(), "lr": 0.01}])

    estimator = make_estimator(tmp_path, optimizer_fn=two_rates, save_summary_steps=1)
    estimator.train(lambda params: make_data(32), steps=2)
    tags = set()
    for name in os.listdir(tmp_path):
        if name.startswith("events.out"):
            accumulator = EventAccumulator(str(tmp_path / name))
            accumulator.Reload()
            tags |= set(accumulator.Tags()["scalars"])
    assert {"learning_rate/default/0", "learning_rate/default/1"} <= tags
    assert "learning_rate" not in tags


def test_export_says_which_batch_size_it_is_lowering(tmp_path, caplog):
    estimator = make_estimator(tmp_path / "model")
    estimator.train(lambda params: make_data(16), steps=1)
    caplog.set_level("INFO", logger="torch_tpu_estimator")
    estimator.export_saved_model(tmp_path / "exports", make_data(4).tensors[0][:2],
                                 batch_sizes=(1, 4))
    assert [record.getMessage() for record in caplog.records
            if record.getMessage().startswith("export: lowering")] == [
        "export: lowering model_fn at batch size 1 (1 of 2)",
        "export: lowering model_fn at batch size 4 (2 of 2)"]


def test_help_answers_before_torch_is_imported():
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "torch_tpu_estimator",
                           "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "inspect" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "torch" not in imported and "numpy" not in imported
    assert time.perf_counter() - started < 30
