"""A bucket model_dir under faults, on the session's S3 server: SIGKILLs during training and
uploads, and the server going away mid-upload. (test_object_storage.py has the rest; two files
so that two test workers share the work.)"""

from __future__ import annotations

import json
import time

import fsspec
import pytest
from helpers import make_estimator
from test_object_storage import input_fn, s3


def test_sigkills_while_training_and_uploading_then_a_restart_end_bit_for_bit(
        tmp_path, bucket, monkeypatch):
    from test_random_input_resume import sigkills_then_a_restart_end_bit_for_bit

    monkeypatch.setenv("TORCH_TPU_ESTIMATOR_LEASE_SECONDS", "1")  # a killed job's lease lapses
    sigkills_then_a_restart_end_bit_for_bit(tmp_path, "xla", f"{bucket}/run", restart_after=1.1)
    names = {path.rsplit("/", 1)[-1] for path in s3().ls(f"{bucket}/run", detail=False)}
    index = json.loads(s3().cat_file(f"{bucket}/run/checkpoint.json"))
    assert {name for name in names if name.startswith("model.ckpt-")} == \
        set(index["checkpoints"])  # every killed upload's leftover was removed


def test_the_server_stopped_mid_upload_is_a_clear_error_and_publishes_nothing(
        tmp_path, monkeypatch, s3_endpoint):
    """A server of its own, stopped while a checkpoint uploads, then started again on the same
    port (moto keeps its buckets in the process)."""
    from moto.server import ThreadedMotoServer

    from torch_tpu_estimator.state import stores
    from torch_tpu_estimator.state.uploads import CheckpointUploadError

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("TORCH_TPU_ESTIMATOR_LEASE_SECONDS", "1")  # not released in the outage
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the client's retries: no need to wait them out
    monkeypatch.setattr(stores, "_OBJECT_STORES", {})  # a client for this server
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("outage")
    upload = stores.ObjectStore.upload

    def upload_during_an_outage(self, local, path, last=None):
        if path.endswith("model.ckpt-4.pt"):
            server.stop()
        upload(self, local, path, last)

    monkeypatch.setattr(stores.ObjectStore, "upload", upload_during_an_outage)
    estimator = make_estimator("s3://outage/run", iterations_per_loop=2, save_checkpoints_steps=2)
    try:
        with pytest.raises(CheckpointUploadError, match="publishing the checkpoint of step 4"):
            estimator.train(input_fn, steps=6)
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    try:
        index = json.loads(fs.cat_file("s3://outage/run/checkpoint.json"))
        assert index["checkpoints"] == ["model.ckpt-2.pt"]
        monkeypatch.setattr(stores.ObjectStore, "upload", upload)
        time.sleep(1.1)  # the lease could not be marked released: it lapses
        estimator.train(input_fn, steps=4)  # resumes from step 2, once the server is back
        assert estimator.latest_checkpoint() == "s3://outage/run/model.ckpt-6.pt"
    finally:
        server.stop()
