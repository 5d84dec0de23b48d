"""Train a small MLP on scikit-learn's bundled 8x8 digits with TPUEstimator (no download).

    PJRT_DEVICE=CPU python examples/digits.py --model-dir runs/digits          # XLA CPU backend
    python examples/digits.py --model-dir runs/digits-cpu --no-tpu              # plain PyTorch
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python examples/digits.py --spmd          # 4-device mesh
    PJRT_DEVICE=CPU python examples/digits.py --bf16                            # bfloat16
    python examples/digits.py --no-tpu --processes 4                            # 4 gloo replicas

After training it evaluates, predicts, exports the model for serving (StableHLO, at batch sizes
1, 8 and 32) under <model-dir>/export, and serves a few digits from that export.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

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


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 digits, pixels scaled to [0, 1], split 80/20 into train and held-out sets."""
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels)
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


class MLP(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def metric_fn(labels, logits):
    """Runs on the host over every held-out example, padding removed."""
    return {"accuracy": metrics.accuracy(labels, logits.argmax(-1))}


def model_fn(model, features, labels, mode, params):
    logits = model(features)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"class": logits.argmax(-1), "logits": logits})
    if mode == ModeKeys.EVAL:
        per_example_loss = F.cross_entropy(logits, labels, reduction="none")
        return TPUEstimatorSpec(mode, loss=per_example_loss, eval_metrics=(metric_fn, [labels, logits]))
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))


def optimizer_fn(model, params):
    optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"])
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=300, gamma=0.5)


def make_estimator(model_dir: str, use_tpu: bool = True, iterations_per_loop: int = 50,
                   spmd: bool = False, processes: int | None = None,
                   precision: str = "fp32") -> TPUEstimator:
    """The same model and global batch on any layout: XLA device(s), an SPMD mesh of every
    device, or `processes` plain PyTorch replicas joined by gloo."""
    return TPUEstimator(
        model_fn=model_fn,
        model_init_fn=lambda params: MLP(params["hidden"]),
        optimizer_fn=optimizer_fn,
        model_dir=model_dir,
        use_tpu=use_tpu,
        config=RunConfig(
            save_checkpoints_steps=200, log_step_count_steps=100, save_summary_steps=20,
            tpu_config=TPUConfig(iterations_per_loop=iterations_per_loop, num_shards=processes,
                                 strategy="spmd" if spmd else "mp", precision=precision)),
        params={"hidden": 128, "lr": 3e-3},
        train_batch_size=64, eval_batch_size=64, predict_batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="runs/digits")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--no-tpu", action="store_true", help="plain PyTorch instead of XLA")
    parser.add_argument("--spmd", action="store_true",
                        help="one process over a mesh of every XLA device (set CPU_NUM_DEVICES)")
    parser.add_argument("--processes", type=int, default=None,
                        help="with --no-tpu: this many replica processes joined by gloo")
    parser.add_argument("--bf16", action="store_true",
                        help="model_fn under bfloat16 autocast (float32 weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)

    train_set, test_set = digits_datasets()
    estimator = make_estimator(args.model_dir, use_tpu=not args.no_tpu, spmd=args.spmd,
                               processes=args.processes, precision="bf16" if args.bf16 else "fp32")
    losses = LossHistory()
    estimator.train(lambda params: train_set, max_steps=args.steps, hooks=[losses])
    if losses.first is not None:
        print(f"training loss fell from {losses.first:.3f} to {losses.last:.3f}")

    results = estimator.evaluate(lambda params: test_set)
    print(f"held-out accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f} over "
          f"{len(test_set)} digits at step {results['global_step']}")

    images_only = TensorDataset(test_set.tensors[0])
    predictions = list(estimator.predict(lambda params: images_only))
    correct = sum(int(p["class"]) == int(y) for p, y in zip(predictions, test_set.tensors[1], strict=True))
    print(f"predicted {len(predictions)} digits, {correct} correct; first five: "
          f"{[int(p['class']) for p in predictions[:5]]}")

    # One example fixes the signature (dtype, per-example shape); the batch sizes are buckets.
    export_dir = estimator.export_saved_model(os.path.join(args.model_dir, "export"),
                                              test_set.tensors[0][:1])
    served = load_exported(export_dir)(test_set.tensors[0][:5])
    print(f"exported to {export_dir}; served from the export, first five: "
          f"{served['class'].tolist()}")


if __name__ == "__main__":
    main()
