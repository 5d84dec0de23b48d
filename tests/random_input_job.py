"""A training job whose input draws random numbers on the host, for the SIGKILL fuzz of
test_random_input_resume.py: input_fn draws noise when called, the Dataset draws a random
augmentation per example from torch, Python and NumPy, and the model applies dropout.

Usage: python random_input_job.py MODEL_DIR LAYOUT MAX_STEPS [WINDOW_STEPS]; the chief prints
"step N" at every window end and "done N" with the final global step. A restart may take other
windows (WINDOW_STEPS, 3 by default) and must still end bit for bit."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from helpers import adam_with_schedule, make_data, make_estimator
from torch.utils.data import Dataset

from torch_tpu_estimator import DatasetConfig, Hook

LAYOUTS = {"xla": {}, "spmd4": {"strategy": "spmd"}, "torch": {"use_tpu": False},
           "gloo2": {"use_tpu": False, "num_shards": 2},
           "xla_replay": {"tpu_config_extra": {"replay_training": True}},
           "torchrun": {"use_tpu": False}}  # as many gloo replicas as torchrun started


class Augmented(Dataset):
    """make_data's examples with input_fn's noise added, then jittered, scaled and flipped at
    random on every read."""

    def __init__(self, noise: torch.Tensor):
        self.features, self.labels = make_data(len(noise)).tensors
        self.noise = noise

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, index: int):
        features = self.features[index] + self.noise[index] + 0.1 * torch.randn(8)
        features = features * random.uniform(0.9, 1.1)
        if np.random.rand() < 0.5:
            features = features.flip(0)
        return features, self.labels[index]


def input_fn(params):
    return Augmented(noise=0.3 * torch.randn(90, 8))  # drawn when input_fn is called


class Announce(Hook):
    def after_window(self, context, window):
        if context.is_chief:
            print(f"step {window.last_step}", flush=True)


if __name__ == "__main__":
    model_dir, layout, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    window = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    estimator = make_estimator(model_dir, optimizer_fn=adam_with_schedule, dropout=0.3,
                               iterations_per_loop=window, save_checkpoints_steps=3,
                               keep_checkpoint_max=3, log_step_count_steps=None,
                               dataset_config=DatasetConfig(shuffle=True), **LAYOUTS[layout])
    estimator.train(input_fn, max_steps=max_steps, hooks=[Announce()])
    print(f"done {int(estimator.get_variable_value('global_step'))}", flush=True)
