"""Hostile files and shared model_dirs: a file read never runs code or reaches outside its
folder, a second trainer is refused, every call's events survive, a deleted index or a full
disk never costs a checkpoint, and a killed export's leftovers are cleaned up safely."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from helpers import make_data, make_estimator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torch_tpu_estimator import CheckpointSaverListener, load_exported
from torch_tpu_estimator.state import checkpoint, files
from torch_tpu_estimator.state.locking import ModelDirInUseError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trained")
    estimator = make_estimator(model_dir, save_checkpoints_steps=2, keep_checkpoint_max=2)
    estimator.train(lambda params: make_data(32), steps=4)
    return model_dir


def _copy(trained, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    return model_dir


def _files(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


# --- a crafted export must not run code -------------------------------------------------------

class _RunsCode:
    """An object whose unpickling creates a file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def export_dir(trained, tmp_path_factory):
    estimator = make_estimator(trained)
    return estimator.export_saved_model(tmp_path_factory.mktemp("exports"), torch.zeros(2, 8),
                                        batch_sizes=(1, 2))


@pytest.mark.parametrize("folder", ["data", "constants"])
def test_load_exported_refuses_a_pickled_array_and_never_runs_it(export_dir, tmp_path, folder):
    crafted = tmp_path / "crafted"
    shutil.copytree(export_dir, crafted)
    directory = crafted / "stablehlo" / folder
    target = directory / (sorted(os.listdir(directory))[0] if os.listdir(directory) else "0")
    marker = tmp_path / "code-ran"
    np.save(open(target, "wb"), np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)

    with pytest.raises(ValueError, match=rf"{target} holds pickled data \(an object array\)"):
        load_exported(str(crafted))
    assert not marker.exists()
    if folder == "data":  # inspect reads the weights' headers, never the constants
        inspected = _inspect(crafted)
        assert inspected.returncode == 2 and str(target) in inspected.stderr
        assert not marker.exists()


def test_load_exported_refuses_a_symlink_leading_out_of_the_export(export_dir, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(export_dir, crafted)
    data = crafted / "stablehlo" / "data"
    victim = data / sorted(os.listdir(data))[0]
    outside = tmp_path / "outside.npy"
    shutil.move(victim, outside)
    os.symlink(outside, victim)
    with pytest.raises(ValueError, match=rf"{victim} is not a regular file"):
        load_exported(str(crafted))


def test_an_export_copied_without_its_empty_folders_serves_and_one_without_functions_is_refused(
        export_dir, tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(export_dir, copied)
    for folder in (copied / "stablehlo" / "constants", copied / "stablehlo" / "data"):
        if folder.is_dir() and not os.listdir(folder):
            folder.rmdir()  # as git or an object store would drop it
    features = torch.randn(2, 8)
    served, original = load_exported(str(copied))(features), load_exported(export_dir)(features)
    assert served.keys() == original.keys()
    assert all(torch.equal(served[key], original[key]) for key in served)

    shutil.rmtree(copied / "stablehlo" / "functions")
    with pytest.raises(ValueError, match=r"no exported function \(functions/\*\.meta\)"):
        load_exported(str(copied))


@pytest.mark.parametrize("field, value, message", [
    ("batch_sizes", ["../../etc/passwd"], "batch size '../../etc/passwd' is not a positive int"),
    ("batch_sizes", [-1], "batch size -1 is not a positive int"),
    ("assets_extra", ["../../outside.txt"], "must be a relative file path inside its folder"),
    ("inputs", [{"name": "x", "dtype": "load", "shape": [8]}], "'load', not a torch dtype"),
])
def test_a_crafted_signature_is_refused_by_field(export_dir, tmp_path, field, value, message):
    crafted = tmp_path / "crafted"
    shutil.copytree(export_dir, crafted)
    signature = json.loads((crafted / "signature.json").read_text())
    signature[field] = value
    (crafted / "signature.json").write_text(json.dumps(signature))
    with pytest.raises(ValueError, match=message):
        load_exported(str(crafted))
    inspected = _inspect(crafted)
    assert inspected.returncode == 2 and message.split()[-1] in inspected.stderr


def _inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch_tpu_estimator", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PJRT_DEVICE="CPU"))


@pytest.mark.parametrize("content", [b"just some text\n", b"PK\x03\x04 not really a zip",
                                     b"\x80\x04K\x01."])
def test_inspect_on_a_file_that_is_not_a_checkpoint_is_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    inspected = _inspect(path)
    assert inspected.returncode == 2
    assert inspected.stderr.count("\n") == 1 and "Traceback" not in inspected.stderr
    assert inspected.stderr.startswith(f"inspect: {path} is not a checkpoint, a model_dir or an "
                                       "export")


# --- names in checkpoint.json stay inside model_dir -----------------------------------------

@pytest.mark.parametrize("entry", ["../victim.pt", "/abs/victim.pt", "sub/model.ckpt-1.pt",
                                   "notes.txt"])
def test_an_index_entry_outside_model_dir_is_refused_and_nothing_is_touched(trained, tmp_path,
                                                                           entry):
    model_dir = _copy(trained, tmp_path)
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"not yours")
    index = json.loads((model_dir / "checkpoint.json").read_text())
    entry = entry.replace("/abs", str(tmp_path))
    index["checkpoints"].insert(0, entry)
    index["sha256"][entry] = "0" * 64  # "damaged": the old code renamed it to .damaged
    (model_dir / "checkpoint.json").write_text(json.dumps(index))
    before = _files(tmp_path)
    estimator = make_estimator(model_dir, keep_checkpoint_max=1)
    for call in (lambda: estimator.train(lambda params: make_data(32), steps=2),
                 lambda: estimator.evaluate(lambda params: make_data(8)),
                 estimator.latest_checkpoint):
        with pytest.raises(ValueError, match=rf"names {entry!r}, which is not a"):
            call()
    assert _files(tmp_path) == before


def test_a_checkpoint_with_a_negative_or_non_int_global_step_is_refused_by_name(trained,
                                                                              tmp_path):
    for step in (-3, 2.5, "7"):
        model_dir = _copy(trained, tmp_path / str(step))
        path = model_dir / "model.ckpt-4.pt"
        state = torch.load(path, weights_only=True)
        state["global_step"] = step
        torch.save(state, path)
        index = json.loads((model_dir / "checkpoint.json").read_text())
        index["sha256"]["model.ckpt-4.pt"] = files.sha256(str(path))
        (model_dir / "checkpoint.json").write_text(json.dumps(index))
        estimator = make_estimator(model_dir)
        with pytest.raises(ValueError, match=rf"checkpoint '{path}' has global_step {step!r}: "
                                             "expected an int >= 0"):
            estimator.train(lambda params: make_data(32), steps=2)


# --- a deleted index, damaged twice, unlisted files ------------------------------------------

@pytest.mark.parametrize("how", ["deleted", "lists-only-missing-files"])
def test_checkpoints_without_their_index_are_refused_never_overwritten(trained, tmp_path, how):
    model_dir = _copy(trained, tmp_path)
    if how == "deleted":
        os.remove(model_dir / "checkpoint.json")
    else:
        (model_dir / "checkpoint.json").write_text(json.dumps(
            {"checkpoints": ["model.ckpt-99.pt"], "sha256": {}}))
    before = _files(model_dir)
    estimator = make_estimator(model_dir, save_checkpoints_steps=2)
    with pytest.raises(ValueError, match=r"holds checkpoint files that its index "
                                         r"\(checkpoint\.json\) does not list: "
                                         r"model\.ckpt-4\.pt\."):
        estimator.train(lambda params: make_data(32), steps=4)
    with pytest.raises(ValueError, match="does not list"):
        estimator.evaluate(lambda params: make_data(8))
    assert _files(model_dir) == before


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_second_damage_of_the_same_checkpoint_gets_a_new_damaged_name(tmp_path):
    estimator = make_estimator(tmp_path, save_checkpoints_steps=4, iterations_per_loop=4)
    data = make_data(64)
    estimator.train(lambda params: data, max_steps=8)
    damaged_versions = []
    for _ in range(2):
        _flip_a_byte(tmp_path / "model.ckpt-8.pt")
        damaged_versions.append((tmp_path / "model.ckpt-8.pt").read_bytes())
        checkpoint._VERIFIED.clear()  # as a new process would: hash again
        estimator.train(lambda params: data, max_steps=8)  # resumes from 4, writes 8 again
    assert (tmp_path / "model.ckpt-8.pt.damaged").read_bytes() == damaged_versions[0]
    assert (tmp_path / "model.ckpt-8.pt.damaged.1").read_bytes() == damaged_versions[1]


# --- a full disk -----------------------------------------------------------------------------

def test_a_full_disk_during_a_save_says_so_names_the_file_and_keeps_earlier_checkpoints(
        tmp_path, monkeypatch):
    estimator = make_estimator(tmp_path, save_checkpoints_steps=4, iterations_per_loop=4)
    data = make_data(64)
    estimator.train(lambda params: data, max_steps=4)
    before = _files(tmp_path)
    real_fdopen = os.fdopen

    class FullDisk:
        """A file whose writes fail with ENOSPC after 1 KB, as on a full disk."""

        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(
        real_fdopen(fd, *args, **kwargs)))
    with pytest.raises(OSError, match=rf"no space left on device while writing "
                                      rf"{tmp_path}/model\.ckpt-8\.pt") as raised:
        estimator.train(lambda params: data, max_steps=8)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    after = {name: content for name, content in _files(tmp_path).items()
             if not name.startswith("events.")}
    assert after == {name: content for name, content in before.items()
                     if not name.startswith("events.")}
    assert estimator.latest_checkpoint() == str(tmp_path / "model.ckpt-4.pt")


# --- model_dir that cannot be used ----------------------------------------------------------

def test_a_dangling_symlink_as_model_dir_is_a_clear_error(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "model")
    with pytest.raises(ValueError, match=r"is a symbolic link to .*gone', which does not exist"):
        make_estimator(tmp_path / "model")


READ_ONLY = r"""
import json, sys
from helpers import make_data, make_estimator, model_fn
steps = []
def counting(model, features, labels, mode, params):
    steps.append(1)
    return model_fn(model, features, labels, mode, params)
try:
    make_estimator(sys.argv[1], fn=counting).train(lambda params: make_data(32), steps=4)
except PermissionError as error:
    print(json.dumps({"error": str(error), "steps": len(steps)}))
"""


@pytest.fixture
def public_tmp():
    """A folder every user can enter (pytest's tmp_path is private to its owner)."""
    path = tempfile.mkdtemp(prefix="torch_tpu_estimator-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_read_only_model_dir_is_found_before_the_first_step(public_tmp):
    model_dir, home = os.path.join(public_tmp, "model"), os.path.join(public_tmp, "home")
    os.mkdir(model_dir, 0o555)
    os.mkdir(home, 0o777)
    os.chmod(model_dir, 0o555)
    os.chmod(home, 0o777)
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__), HOME=home)
    # root writes anywhere: the job runs as nobody, for whom the folder is read-only
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.getuid() == 0 else []
    result = subprocess.run([*as_nobody, sys.executable, "-c", READ_ONLY, model_dir], env=env,
                            capture_output=True, text=True, timeout=300, cwd=home)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["steps"] == 0
    assert outcome["error"].startswith(f"[Errno 13] model_dir '{model_dir}' is not writable")
    assert os.listdir(model_dir) == []


AS_NOBODY = r"""
import json, logging, os, sys
from helpers import make_data, make_estimator
logging.basicConfig(level=logging.INFO)
estimator = make_estimator(sys.argv[1])
results = estimator.evaluate(lambda params: make_data(16))
estimator.train(lambda params: make_data(32), max_steps=4)  # already there: nothing to write
print(json.dumps({"loss": results["loss"], "step": results["global_step"]}))
"""


def _as_nobody(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """Runs `script` as the account nobody (root writes anywhere; nobody only where allowed)."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__), HOME=cwd)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.getuid() == 0 else []
    return subprocess.run([*as_nobody, sys.executable, "-c", script, *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_another_account_evaluates_a_read_only_model_dir(public_tmp):
    """Checkpoints follow the umask (0644 here, not mkstemp's 0600), so another account can
    read them; with model_dir read-only to it, evaluate returns its results and says it could
    not write them, and a train() already at max_steps needs no write at all."""
    model_dir, home = os.path.join(public_tmp, "model"), os.path.join(public_tmp, "home")
    os.mkdir(home)
    os.chmod(home, 0o777)
    old_umask = os.umask(0o022)
    try:
        make_estimator(model_dir).train(lambda params: make_data(32), steps=4)
    finally:
        os.umask(old_umask)
    modes = {name: os.stat(os.path.join(model_dir, name)).st_mode & 0o777
             for name in os.listdir(model_dir)}
    assert modes["model.ckpt-4.pt"] == modes["checkpoint.json"] == modes["run.json"] == 0o644
    os.chmod(model_dir, 0o555)
    before = sorted(os.listdir(model_dir))
    result = _as_nobody(AS_NOBODY, model_dir, cwd=home)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["step"] == 4 and outcome["loss"] > 0
    assert f"evaluate cannot write its results to {model_dir}/eval (Permission denied)" in \
        result.stderr
    assert "Skipping training: global step 4 is already at max_steps 4" in result.stderr
    assert sorted(os.listdir(model_dir)) == before


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                          (0o027, 0o640, 0o750)])
def test_files_and_folders_the_library_writes_follow_the_umask(tmp_path, umask, file_mode,
                                                               folder_mode):
    old_umask = os.umask(umask)
    try:
        make_estimator(tmp_path / "model").train(lambda params: make_data(32), steps=2)
        written = files.atomic_directory(str(tmp_path / "folder"), lambda directory: None)
    finally:
        os.umask(old_umask)
    assert written
    for name in ("model.ckpt-2.pt", "checkpoint.json", "run.json"):
        assert os.stat(tmp_path / "model" / name).st_mode & 0o777 == file_mode, name
    assert os.stat(tmp_path / "folder").st_mode & 0o777 == folder_mode


def test_a_symlink_planted_as_the_lock_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(victim, model_dir / ".train.lock")
    with pytest.raises(ValueError, match=r"\.train\.lock is a symbolic link: training keeps its "
                                         r"lock in that file and neither follows nor replaces"):
        make_estimator(model_dir).train(lambda params: make_data(32), steps=1)
    assert victim.read_text() == "precious"
    assert os.listdir(model_dir) == [".train.lock"]


def test_a_folder_as_the_lock_file_is_a_clear_error(tmp_path):
    (tmp_path / ".train.lock").mkdir()
    with pytest.raises(ValueError, match=r"\.train\.lock is not a regular file"):
        make_estimator(tmp_path).train(lambda params: make_data(32), steps=1)


def test_a_temporary_checkpoint_name_that_is_a_symlink_is_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.symlink(outside, model_dir / ".tmp-checkpoint-planted")
    make_estimator(model_dir).train(lambda params: make_data(32), steps=1)
    assert (outside / "keep.txt").read_text() == "keep"
    assert not os.path.lexists(model_dir / ".tmp-checkpoint-planted")
    assert (model_dir / "model.ckpt-1.pt").exists()


# --- two trainers, readers while training ---------------------------------------------------

HOLDER = r"""
import os, sys, time
from helpers import make_data, make_estimator
from torch_tpu_estimator import Hook
model_dir, ready, release = sys.argv[1:4]

class WaitAtFirstWindow(Hook):
    waited = False
    def after_window(self, context, window):  # holds the model_dir lock, before any save
        if not self.waited:
            self.waited = True
            open(ready, "w").close()
            while not os.path.exists(release):
                time.sleep(0.05)

make_estimator(model_dir, save_checkpoints_steps=2).train(
    lambda params: make_data(64), steps=8, hooks=[WaitAtFirstWindow()])
print("finished")
"""


def _start_holder(model_dir, tmp_path) -> subprocess.Popen:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir),
                               str(tmp_path / "ready"), str(tmp_path / "release")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():
        assert holder.poll() is None, holder.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return holder


def test_a_second_trainer_is_refused_while_readers_keep_working(trained, tmp_path):
    model_dir = _copy(trained, tmp_path)
    holder = _start_holder(model_dir, tmp_path)
    try:
        second = make_estimator(model_dir, save_checkpoints_steps=2)
        with pytest.raises(ModelDirInUseError,
                           match=rf"model_dir '{model_dir}' is in use by another trainer: pid "
                                 rf"{holder.pid} on host {socket.gethostname()}"):
            second.train(lambda params: make_data(64), steps=2)
        # readers take no lock
        assert second.evaluate(lambda params: make_data(16))["global_step"] == 4
        assert len(list(second.predict(lambda params: make_data(5)))) == 5
        assert second.get_variable_value("global_step") == 4
        assert os.path.isdir(second.export_saved_model(tmp_path / "exports", torch.zeros(1, 8),
                                                       batch_sizes=(1,)))
        assert _inspect(model_dir).returncode == 0
    finally:
        (tmp_path / "release").touch()
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0 and "finished" in out, err[-3000:]
    assert not (model_dir / ".train.lock").exists()
    second.train(lambda params: make_data(64), steps=2)  # free again
    assert second.get_variable_value("global_step") == 14  # 4, the holder's 8, then 2


def test_a_killed_trainer_leaves_no_stale_lock(trained, tmp_path):
    model_dir = _copy(trained, tmp_path)
    holder = _start_holder(model_dir, tmp_path)
    holder.kill()
    holder.communicate(timeout=60)
    assert (model_dir / ".train.lock").exists()  # the file stays, the kernel freed its lock
    estimator = make_estimator(model_dir)
    estimator.train(lambda params: make_data(64), steps=2)
    assert estimator.get_variable_value("global_step") == 6  # the holder saved nothing


# --- every call's events survive ------------------------------------------------------------

def _scalars(directory, tag) -> dict[int, float]:
    values = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("events.out.tfevents."):
            accumulator = EventAccumulator(os.path.join(directory, name))
            accumulator.Reload()
            if tag in accumulator.Tags()["scalars"]:
                values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


class _FrozenSecond:
    """time for tensorboardX's event file writer: every file is named in the same second."""

    @staticmethod
    def time() -> float:
        return 1795600000.25


def test_two_quick_calls_keep_every_steps_summaries(tmp_path, monkeypatch):
    monkeypatch.setattr("tensorboardX.event_file_writer.time", _FrozenSecond)
    estimator = make_estimator(tmp_path, save_summary_steps=1, iterations_per_loop=5)
    data = make_data(64)
    estimator.train(lambda params: data, steps=5)
    estimator.train(lambda params: data, steps=5)
    estimator.evaluate(lambda params: data, name="quick")
    estimator.train(lambda params: data, steps=1)
    estimator.evaluate(lambda params: data, name="quick")
    assert sorted(_scalars(tmp_path, "loss")) == list(range(1, 12))
    assert sorted(_scalars(tmp_path / "eval_quick", "loss")) == [10, 11]


# --- a killed export's temporary folder ----------------------------------------------------

HOLD_FOLDER = r"""
import sys, time
from torch_tpu_estimator.state.locking import hold_directory
hold_directory(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_exports_temporary_is_removed_and_a_running_ones_is_not(trained, tmp_path):
    base = tmp_path / "exports"
    abandoned, running = base / ".tmp-export-killed", base / ".tmp-export-running"
    for folder in (abandoned, running):
        folder.mkdir(parents=True)
        (folder / "half-written").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(running)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        path = make_estimator(trained).export_saved_model(base, torch.zeros(1, 8),
                                                          batch_sizes=(1,))
        assert not abandoned.exists()
        assert (running / "half-written").exists()
        assert sorted(os.listdir(base)) == sorted([os.path.basename(path), running.name])
    finally:
        holder.kill()
        holder.wait()


def test_a_scalar_eval_loss_over_a_padded_batch_warns_once(trained, caplog):
    estimator = make_estimator(trained)
    with caplog.at_level(logging.WARNING, logger="torch_tpu_estimator"):
        estimator.evaluate(lambda params: make_data(16))  # two whole batches of 8
        assert "reduction" not in caplog.text
        estimator.evaluate(lambda params: make_data(21))
    warnings = [record for record in caplog.records if 'reduction="none"' in record.message]
    assert len(warnings) == 1
    assert "(5 real of 8 rows)" in warnings[0].message


def test_a_file_planted_at_the_next_checkpoint_s_name_is_moved_aside_never_overwritten(tmp_path):
    """Someone else's file appears mid-run where the next checkpoint goes: it is kept, byte for
    byte, as <name>.unlisted, and the new checkpoint is listed and loads."""
    planted = b"not a checkpoint of this run"

    class Planter(CheckpointSaverListener):
        def before_save(self, context):
            if context.global_step == 6:
                (tmp_path / "model.ckpt-6.pt").write_bytes(planted)

    estimator = make_estimator(tmp_path, save_checkpoints_steps=3, iterations_per_loop=3)
    estimator.train(lambda params: make_data(64), steps=6, saving_listeners=[Planter()])
    assert (tmp_path / "model.ckpt-6.pt.unlisted").read_bytes() == planted
    assert estimator.latest_checkpoint() == str(tmp_path / "model.ckpt-6.pt")
    assert int(estimator.get_variable_value("global_step")) == 6
