"""model_dir in a bucket: an S3 server on localhost (moto's server mode, real HTTP through s3fs),
never a mock of a client. Results equal a local model_dir's bit for bit; the crash contract and
the lease hold on a store without rename or flock."""

from __future__ import annotations

import json
import logging
import threading
import time

import fsspec
import pytest
from helpers import make_data, make_estimator

from torch_tpu_estimator.state import checkpoint, lease
from torch_tpu_estimator.state.locking import ModelDirInUseError
from torch_tpu_estimator.state.stores import store_for


def input_fn(params):
    return make_data(64)


def s3():
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def weights(estimator):
    return {name: estimator.get_variable_value(name) for name in estimator.get_variable_names()}


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] == second[name]).all(), name


def test_train_evaluate_predict_in_a_bucket_equal_a_local_model_dir(tmp_path, bucket):
    local = make_estimator(tmp_path / "run", save_checkpoints_steps=4, save_summary_steps=2)
    remote = make_estimator(f"{bucket}/run", save_checkpoints_steps=4, save_summary_steps=2)
    local.train(input_fn, steps=10)
    remote.train(input_fn, steps=6)
    remote.train(input_fn, steps=4)  # resumed from the bucket

    assert remote.latest_checkpoint() == f"{bucket}/run/model.ckpt-10.pt"
    assert_same_weights(weights(local), weights(remote))
    assert local.evaluate(input_fn, steps=4) == remote.evaluate(input_fn, steps=4)
    local_predictions = [row["logits"] for row in local.predict(input_fn)]
    remote_predictions = [row["logits"] for row in remote.predict(input_fn)]
    assert all((a == b).all() for a, b in zip(local_predictions, remote_predictions,
                                              strict=True))

    names = {path.rsplit("/", 1)[-1] for path in s3().ls(f"{bucket}/run", detail=False)}
    assert {"checkpoint.json", "run.json", "model.ckpt-10.pt", "eval"} <= names
    events = [path for path in s3().find(f"{bucket}/run") if "events.out.tfevents" in path]
    assert any("/run/eval/" in path for path in events)
    assert any("/run/events" in path for path in events)  # training's
    index = json.loads(s3().cat_file(f"{bucket}/run/checkpoint.json"))
    assert index["latest"] == "model.ckpt-10.pt"
    assert not any(name.startswith(".train.lease") and not json.loads(
        s3().cat_file(f"{bucket}/run/{name}"))["released"] for name in names)


def test_a_second_trainer_is_refused_naming_the_holder(bucket):
    store = store_for(f"{bucket}/run")
    with lease.hold_lease(store, f"{bucket}/run"):
        with pytest.raises(ModelDirInUseError, match=r"in use by another trainer: pid \d+ on "
                                                     r"host .* holds its lease"):
            make_estimator(f"{bucket}/run").train(input_fn, steps=2)
    assert not s3().exists(f"{bucket}/run/checkpoint.json")
    make_estimator(f"{bucket}/run").train(input_fn, steps=2)  # released: free again


def test_a_dead_trainers_lease_is_taken_over_once_expired(bucket, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_TPU_ESTIMATOR_LEASE_SECONDS", "1.5")
    dead = lease.Lease(store_for(f"{bucket}/run"), f"{bucket}/run")
    dead.acquire()
    dead._stop.set()  # it stops renewing, as a killed trainer does, and never releases
    with pytest.raises(ModelDirInUseError, match="expires in"):
        make_estimator(f"{bucket}/run").train(input_fn, steps=2)
    time.sleep(1.6)
    with caplog.at_level(logging.WARNING, logger="torch_tpu_estimator"):
        make_estimator(f"{bucket}/run").train(input_fn, steps=2)
    assert "took over the expired lease" in caplog.text
    with pytest.raises(ModelDirInUseError, match="lost its lease"):
        dead.check()  # were it to wake up, it would publish nothing more


def test_of_two_racing_trainers_exactly_one_takes_the_lease(bucket):
    store = store_for(f"{bucket}/run")
    first, second = lease.Lease(store, f"{bucket}/run"), lease.Lease(store, f"{bucket}/run")
    first.acquire()
    try:
        assert not store.create_new(f"{bucket}/run/.train.lease.0", b"{}")  # the race's loser
        with pytest.raises(ModelDirInUseError):
            second.acquire()
        first.check()  # still the holder
    finally:
        first.release()


def test_an_upload_the_index_does_not_list_is_never_read_and_is_removed(bucket, caplog):
    estimator = make_estimator(f"{bucket}/run", save_checkpoints_steps=2)
    estimator.train(input_fn, steps=2)
    # a trainer killed while uploading step 4's checkpoint: the object is there, unlisted
    s3().pipe_file(f"{bucket}/run/model.ckpt-4.pt", b"half an upload")
    assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-2.pt"
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        estimator.train(input_fn, steps=1)
    assert "Removed model.ckpt-4.pt" in caplog.text
    assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-3.pt"
    assert not s3().exists(f"{bucket}/run/model.ckpt-4.pt")


def test_a_first_upload_killed_before_any_index_does_not_block_the_next_run(bucket):
    store = store_for(f"{bucket}/run")
    checkpoint.start_index(f"{bucket}/run")  # what a trainer does once it holds the lease
    s3().pipe_file(f"{bucket}/run/model.ckpt-2.pt", b"killed mid-upload")
    estimator = make_estimator(f"{bucket}/run")
    estimator.train(input_fn, steps=3)
    assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-3.pt"
    assert not store.exists(f"{bucket}/run/model.ckpt-2.pt")


def test_a_damaged_checkpoint_in_a_bucket_is_skipped_then_set_aside(bucket, caplog):
    estimator = make_estimator(f"{bucket}/run", iterations_per_loop=2, save_checkpoints_steps=2)
    estimator.train(input_fn, steps=4)
    checkpoint._VERIFIED.clear()  # as a new process would: hash again
    s3().pipe_file(f"{bucket}/run/model.ckpt-4.pt", b"changed in the bucket")
    with caplog.at_level(logging.WARNING, logger="torch_tpu_estimator"):
        assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-2.pt"
        estimator.train(input_fn, steps=1)
    assert "is damaged" in caplog.text
    assert s3().cat_file(f"{bucket}/run/model.ckpt-4.pt.damaged") == b"changed in the bucket"
    assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-3.pt"


def test_a_url_of_a_store_this_machine_cannot_reach_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"model_dir 'nosuchstore://b/run' is on a store this "
                                         r"machine cannot reach"):
        make_estimator("nosuchstore://b/run")
    assert list(tmp_path.iterdir()) == []


def test_export_warm_start_inspect_and_train_and_evaluate_with_a_bucket(tmp_path, bucket, capsys):
    from torch_tpu_estimator import KeepBestCheckpoint, load_exported, train_and_evaluate
    from torch_tpu_estimator.cli.main import main as cli

    local = make_estimator(tmp_path / "run")
    remote = make_estimator(f"{bucket}/run")
    histories = [train_and_evaluate(estimator, input_fn, input_fn, max_steps=8,
                                    steps_between_evals=4, eval_hooks=[KeepBestCheckpoint(best)])
                 for estimator, best in ((local, str(tmp_path / "best")),
                                         (remote, f"{bucket}/best"))]
    assert histories[0] == histories[1]
    best = json.loads(s3().cat_file(f"{bucket}/best/best.json"))
    assert best == json.loads((tmp_path / "best" / "best.json").read_text())
    assert s3().cat_file(f"{bucket}/best/{best['checkpoint']}") == \
        (tmp_path / "best" / best["checkpoint"]).read_bytes()

    features = make_data(5).tensors[0]
    local_export = load_exported(local.export_saved_model(tmp_path / "exports", features[:2]))
    remote_dir = remote.export_saved_model(f"{bucket}/exports", features[:2])
    assert remote_dir.startswith(f"{bucket}/exports/")
    # an export whose upload was killed (no signature yet) is newer but never served
    s3().pipe_file(f"{bucket}/exports/99999999999/stablehlo/data/x", b"half")
    served = load_exported(f"{bucket}/exports")
    assert (served(features)["logits"] == local_export(features)["logits"]).all()

    warm = [make_estimator(tmp_path / name, warm_start_from=source) for name, source in
            (("warm_local", str(tmp_path / "run")), ("warm_remote", f"{bucket}/run"))]
    for estimator in warm:
        estimator.train(input_fn, steps=1)
    assert_same_weights(weights(warm[0]), weights(warm[1]))
    assert cli(["inspect", f"{bucket}/run"]) == 0
    assert "global_step: 8" in capsys.readouterr().out
    assert cli(["inspect", f"{bucket}/exports"]) == 0
    assert "from checkpoint:" in capsys.readouterr().out


def test_uploads_overlap_training_one_at_a_time_and_train_returns_once_published(
        bucket, monkeypatch):
    from torch_tpu_estimator import Hook
    from torch_tpu_estimator.state.stores import ObjectStore

    released, in_flight, most = threading.Event(), [0], [0]
    upload = ObjectStore.upload

    def slow_upload(self, local, path, last=None):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        if path.endswith("model.ckpt-2.pt"):
            assert released.wait(60)
        upload(self, local, path, last)
        in_flight[0] -= 1

    monkeypatch.setattr(ObjectStore, "upload", slow_upload)
    seen = {}

    class WhileTheFirstUploads(Hook):
        def after_window(self, context, window):
            if window.last_step == 4:  # training went on while step 2's checkpoint uploads
                seen["listed"] = json.loads(s3().cat_file(f"{bucket}/run/checkpoint.json"))
                released.set()

    estimator = make_estimator(f"{bucket}/run", iterations_per_loop=2, save_checkpoints_steps=2)
    estimator.train(input_fn, steps=6, hooks=[WhileTheFirstUploads()])
    assert seen["listed"]["checkpoints"] == []  # step 2's upload was still in flight
    assert most[0] == 1
    index = json.loads(s3().cat_file(f"{bucket}/run/checkpoint.json"))
    assert index["latest"] == "model.ckpt-6.pt"  # published before train() returned


def test_a_failed_upload_is_raised_naming_the_checkpoint_and_publishes_nothing(
        bucket, monkeypatch):
    from torch_tpu_estimator.state.stores import ObjectStore
    from torch_tpu_estimator.state.uploads import CheckpointUploadError

    estimator = make_estimator(f"{bucket}/run", iterations_per_loop=2, save_checkpoints_steps=2)
    estimator.train(input_fn, steps=2)
    upload = ObjectStore.upload

    def failing_upload(self, local, path, last=None):
        if path.endswith("model.ckpt-4.pt"):
            raise ConnectionError("the server went away")
        upload(self, local, path, last)

    monkeypatch.setattr(ObjectStore, "upload", failing_upload)
    with pytest.raises(CheckpointUploadError, match=r"publishing the checkpoint of step 4 .* "
                                                    r"failed \(ConnectionError"):
        estimator.train(input_fn, steps=4)
    index = json.loads(s3().cat_file(f"{bucket}/run/checkpoint.json"))
    assert index["latest"] == "model.ckpt-2.pt"
    monkeypatch.setattr(ObjectStore, "upload", upload)
    estimator.train(input_fn, steps=2)  # resumes from step 2
    assert estimator.latest_checkpoint() == f"{bucket}/run/model.ckpt-4.pt"


def test_only_the_latest_local_copies_of_a_buckets_checkpoints_stay_on_disk(bucket):
    import os

    from torch_tpu_estimator.state.stores import KEPT_COPIES, ObjectStore

    store = ObjectStore(bucket)
    for step in range(KEPT_COPIES + 2):
        s3().pipe_file(f"{bucket}/run/model.ckpt-{step}.pt", f"weights {step}".encode())
    copies = [store.local_copy(f"{bucket}/run/model.ckpt-{step}.pt")
              for step in range(KEPT_COPIES + 2)]
    assert [os.path.exists(copy) for copy in copies] == [False, False] + [True] * KEPT_COPIES
    again = store.local_copy(f"{bucket}/run/model.ckpt-0.pt")  # downloaded again when asked
    assert open(again, "rb").read() == b"weights 0"
    served = store.local_copy(f"{bucket}/run/model.ckpt-1.pt", pinned=True)
    for step in range(KEPT_COPIES + 2):
        store.local_copy(f"{bucket}/run/model.ckpt-{step}.pt")
    assert os.path.exists(served)  # an export being served is never removed under it
