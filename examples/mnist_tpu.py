"""MNIST model training using TPUs: tensorflow/tpu's models/official/mnist/mnist_tpu.py, ported.

The structure and names are the TF program's: flags, metric_fn(labels, logits), a TF-style
model_fn(features, labels, mode, params), train/eval/predict input_fns of `params`, a
TPUEstimator built from a RunConfig and a TPUConfig(iterations, num_shards), then train,
evaluate and predict. What differs, and why:

  - The network is a torch.nn.Module (create_model, the CNN of official/mnist/mnist.py), built
    once by `model_init_fn`; model_fn receives it as `model`. The optimizer and the learning-rate
    decay (tf.train.exponential_decay) are built once by `optimizer_fn`, not in model_fn. The
    optimizer is Adam at 1e-3, as in mnist.py (mnist_tpu.py itself used plain gradient descent
    at 0.05).
  - No download: scikit-learn's bundled 8x8 digits stand in for MNIST (images [N, 1, 8, 8] in
    [0, 1]), so the CNN is sized for 8x8 and the decay steps for a run of a few hundred steps.
  - TF needed `eval_steps` (TPUEstimator.evaluate required steps); here evaluation reads the
    whole held-out set by default, padding the last batch, and --eval_steps 0 still skips it.
  - The model is exported for serving (StableHLO) and a few digits are served from the export.

    PJRT_DEVICE=CPU python examples/mnist_tpu.py --model_dir /tmp/mnist --train_steps 200
    python examples/mnist_tpu.py --model_dir /tmp/mnist-cpu --no-use_tpu     # plain PyTorch
"""

from __future__ import annotations

import argparse
import functools
import logging
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from torch_tpu_estimator import (
    LossHistory,
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    load_exported,
    metrics,
)
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.lr_schedules import ExponentialDecay

# tf.train.exponential_decay(FLAGS.learning_rate, global_step, decay_steps=100000,
# decay_rate=0.96) over TF's runs of many thousand steps; scaled to runs of a few hundred.
DECAY_STEPS = 1000
DECAY_RATE = 0.96


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    """The TF program's flags that still apply, under their TF names (--tpu, --tpu_zone,
    --gcp_project and --data_dir do not: there is no cluster resolver and no download)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="runs/mnist_tpu", help="Estimator model_dir")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="Mini-batch size for the training. Note that this is the global "
                        "batch size and not the per-shard batch.")
    parser.add_argument("--train_steps", type=int, default=400, help="Total number of training steps.")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="Number of evaluation batches; by default the whole held-out set. "
                        "If 0, evaluation after training is skipped.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Learning rate.")
    parser.add_argument("--use_tpu", action=argparse.BooleanOptionalAction, default=True,
                        help="Use XLA devices (TPU, or the XLA CPU backend with PJRT_DEVICE=CPU) "
                        "rather than plain PyTorch")
    parser.add_argument("--enable_predict", action=argparse.BooleanOptionalAction, default=True,
                        help="Do some predictions at the end")
    parser.add_argument("--iterations", type=int, default=50,
                        help="Number of iterations per TPU training loop.")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="Number of shards (TPU chips); by default every local device.")
    parser.add_argument("--export_dir", default=None,
                        help="Where the model is exported for serving; <model_dir>/export by default.")
    return parser.parse_args(argv)


def metric_fn(labels, logits):
    accuracy = metrics.accuracy(labels=labels, predictions=logits.argmax(dim=1))
    return {"accuracy": accuracy}


class Model(torch.nn.Module):
    """create_model of official/mnist/mnist.py, channels first, for 8x8 images: conv 5x5 32 ->
    max pool -> conv 5x5 64 -> max pool -> dense 1024 -> dropout 0.4 -> dense 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, kernel_size=5, padding="same")
        self.conv2 = torch.nn.Conv2d(32, 64, kernel_size=5, padding="same")
        self.pool = torch.nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = torch.nn.Linear(64 * 2 * 2, 1024)
        self.dropout = torch.nn.Dropout(0.4)  # active in training only: model.train()/.eval()
        self.fc2 = torch.nn.Linear(1024, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.pool(F.relu(self.conv1(image)))
        y = self.pool(F.relu(self.conv2(y)))
        y = F.relu(self.fc1(y.flatten(1)))
        return self.fc2(self.dropout(y))


def create_model(params: dict) -> Model:
    del params
    return Model()


def model_fn(features, labels, mode, params, model):
    """model_fn constructs the ML model used to predict handwritten digits."""

    del params
    image = features
    if isinstance(image, dict):
        image = features["image"]

    logits = model(image)

    if mode == ModeKeys.PREDICT:
        predictions = {
            "class_ids": logits.argmax(dim=1),
            "probabilities": F.softmax(logits, dim=1),
        }
        return TPUEstimatorSpec(mode, predictions=predictions)

    if mode == ModeKeys.TRAIN:
        loss = F.cross_entropy(logits, labels)
        return TPUEstimatorSpec(mode=mode, loss=loss)

    if mode == ModeKeys.EVAL:
        # One loss per example: the reported loss is then exact over a padded last batch.
        loss = F.cross_entropy(logits, labels, reduction="none")
        return TPUEstimatorSpec(mode=mode, loss=loss, eval_metrics=(metric_fn, [labels, logits]))


def optimizer_fn(model, params):
    """TF built these in model_fn; here they are built once, and stepped by the estimator."""
    optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])
    learning_rate = ExponentialDecay(optimizer, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE)
    return optimizer, learning_rate


@functools.cache
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def dataset(split: str) -> TensorSlices:
    """The digits of one split as ({"image": [1, 8, 8]}, label) examples; the estimator batches,
    shuffles and repeats them as TF's .repeat().shuffle().batch() did."""
    images, labels = _splits()[split]
    return TensorSlices(({"image": images}, labels))


def train_input_fn(params):
    """train_input_fn defines the input pipeline used for training."""
    del params  # params["batch_size"]: the estimator batches the Dataset
    return dataset("train")


def eval_input_fn(params):
    del params
    return dataset("test")


def predict_input_fn(params):
    del params
    # Take out top 10 samples from test data to make the predictions.
    images, _ = _splits()["test"]
    return TensorSlices({"image": images[:10]})


def main(argv: list[str] | None = None) -> dict:
    flags = parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)

    # TF's cluster=TPUClusterResolver(...) and session_config have no counterpart here.
    run_config = RunConfig(
        model_dir=flags.model_dir,
        tpu_config=TPUConfig(flags.iterations, flags.num_shards),
    )

    estimator = TPUEstimator(
        model_fn=model_fn,
        model_init_fn=create_model,
        optimizer_fn=optimizer_fn,
        use_tpu=flags.use_tpu,
        train_batch_size=flags.batch_size,
        eval_batch_size=flags.batch_size,
        predict_batch_size=flags.batch_size,
        params={"learning_rate": flags.learning_rate},
        config=run_config)
    results: dict = {"model_dir": estimator.model_dir}

    losses = LossHistory()
    estimator.train(input_fn=train_input_fn, max_steps=flags.train_steps, hooks=[losses])
    if losses.first is not None:
        print(f"training loss fell from {losses.first:.3f} to {losses.last:.3f}")
        results.update(first_loss=losses.first, last_loss=losses.last)

    if flags.eval_steps != 0:
        evaluation = estimator.evaluate(input_fn=eval_input_fn, steps=flags.eval_steps)
        print(f"held-out accuracy {evaluation['accuracy']:.4f}, loss {evaluation['loss']:.4f} "
              f"at step {evaluation['global_step']}")
        results.update(accuracy=evaluation["accuracy"], eval_loss=evaluation["loss"],
                       global_step=int(evaluation["global_step"]))

    if flags.enable_predict:
        predictions = list(estimator.predict(input_fn=predict_input_fn))
        for pred_dict in predictions:
            template = 'Prediction is "{}" ({:.1f}%).'
            class_id = int(pred_dict["class_ids"])
            probability = float(pred_dict["probabilities"][class_id])
            logging.info(template.format(class_id, 100 * probability))
        results["predictions"] = [int(p["class_ids"]) for p in predictions]
        results["probabilities"] = [p["probabilities"].tolist() for p in predictions]

        # One example fixes the serving signature: a dict {"image": float32[1, 8, 8]}.
        images = {"image": _splits()["test"][0][:10]}
        export_dir = estimator.export_saved_model(
            flags.export_dir or os.path.join(estimator.model_dir, "export"),
            {"image": images["image"][:1]})
        served = load_exported(export_dir)(images)
        print(f"exported to {export_dir}; served from the export: {served['class_ids'].tolist()}, "
              f"predicted: {results['predictions']}")
        results.update(export_dir=export_dir, served=served["class_ids"].tolist(),
                       served_probabilities=served["probabilities"].tolist())
    return results


if __name__ == "__main__":
    main()
