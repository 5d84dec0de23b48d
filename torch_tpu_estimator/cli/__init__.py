"""`python -m torch_tpu_estimator`: the command line and what `inspect` prints."""
