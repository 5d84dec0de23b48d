"""The ported TF examples run end to end: examples/mnist_tpu.py (tensorflow/tpu's MNIST program)
and examples/bert_classifier.py (a BERT run_classifier-style fine-tune from a warm start).

Each example's main(argv) runs once, in a fresh interpreter on XLA:CPU, with small step counts;
the tests then check what a user of the example relies on: it learns (held-out accuracy well
above chance), the export serves what predict gave, and the warm start took the encoder and
skipped the new head.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

RUN_MAIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
main = __import__(sys.argv[2]).main
print(json.dumps(main(sys.argv[3:])))
"""


def run_example(name: str, *argv: str) -> tuple[dict, str]:
    """`name`.main(argv) in a new interpreter: the dict it returned, and its stderr (the log)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1")
    result = subprocess.run([sys.executable, "-c", RUN_MAIN, EXAMPLES, name, *argv], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> dict:
    results, _ = run_example("mnist_tpu", "--model_dir", str(tmp_path_factory.mktemp("mnist")),
                             "--train_steps", "150", "--iterations", "50")
    return results


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[dict, str]:
    return run_example("bert_classifier", "--model_dir", str(tmp_path_factory.mktemp("bert")),
                       "--pretrain_steps", "60", "--num_train_steps", "150")


def test_mnist_port_training_loss_falls_and_held_out_digits_are_recognised(mnist):
    assert mnist["global_step"] == 150
    assert mnist["last_loss"] < 0.25 * mnist["first_loss"]
    assert mnist["accuracy"] > 0.85  # chance is 0.1


def test_mnist_port_serves_from_its_export_what_predict_gave(mnist):
    assert os.path.isfile(os.path.join(mnist["export_dir"], "signature.json"))
    assert len(mnist["predictions"]) == 10
    assert mnist["served"] == mnist["predictions"]
    torch.testing.assert_close(torch.tensor(mnist["served_probabilities"]),
                               torch.tensor(mnist["probabilities"]), atol=1e-5, rtol=1e-4)


def test_bert_warm_start_takes_the_pretrained_encoder_and_skips_the_new_head(bert):
    results, log = bert
    pretrained = weights(results["pretrained_checkpoint"])
    warm_started = weights(results["warm_started_checkpoint"])  # after step 1, at learning rate 0
    fine_tuned = weights(results["fine_tuned_checkpoint"])
    body = [name for name in pretrained if not name.startswith("classifier.")]
    assert any(name.startswith("encoder.layers.1.") for name in body)
    assert any(name.startswith("embeddings.") for name in body)
    for name in body:
        torch.testing.assert_close(warm_started[name], pretrained[name], atol=0, rtol=0, msg=name)
    # fine-tuning then trains the encoder too
    assert not torch.equal(fine_tuned["encoder.layers.0.linear1.weight"],
                           pretrained["encoder.layers.0.linear1.weight"])
    # the head has another number of classes: kept from model_init_fn, and said so in the log
    assert pretrained["classifier.weight"].shape[0] == 3
    assert warm_started["classifier.weight"].shape[0] == 2
    assert re.findall(r"Warm start skipped (\S+)", log) == ["classifier.weight", "classifier.bias"]
    assert f"Warm started {len(body)} of the model's {len(pretrained)} weights" in log


def test_bert_fine_tuning_learns_the_sentiment_of_held_out_sentences(bert):
    results, _ = bert
    assert results["global_step"] == 150
    assert results["last_loss"] < 0.5 * results["first_loss"]
    assert results["accuracy"] > 0.8  # two balanced classes: chance is 0.5


def test_bert_serves_from_its_export_what_predict_gave(bert):
    results, _ = bert
    assert os.path.isfile(os.path.join(results["export_dir"], "signature.json"))
    assert len(results["predictions"]) == 10
    assert results["served"] == results["predictions"]
    torch.testing.assert_close(torch.tensor(results["served_probabilities"]),
                               torch.tensor(results["probabilities"]), atol=1e-5, rtol=1e-4)
