"""The replica launcher on its own: results, errors that do not pickle, and replicas that never
outlive the process that launched them (each case in a fresh interpreter, as forking needs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from helpers import run_fresh

RESULTS = r"""
import json, threading
from torch_tpu_estimator.runtime.launcher import launch_processes

class Unpicklable(Exception):
    def __init__(self):
        super().__init__("held a lock")
        self.lock = threading.Lock()

def work(rank, scratch, heartbeats):
    return {"rank": rank, "shared_scratch": bool(scratch)}

def fail(rank, scratch, heartbeats):
    if rank == 2:
        raise Unpicklable()
    return rank

outcome = {"result": launch_processes(3, work)}
try:
    launch_processes(3, fail)
except Exception as error:
    outcome["error"] = [type(error).__name__, str(error), error.__notes__[0].splitlines()[0]]
print(json.dumps(outcome))
"""

ORPHANS = r"""
import os, sys, time
from torch_tpu_estimator.runtime.launcher import launch_processes

def sleep_forever(rank, scratch, heartbeats):
    with open(os.path.join(sys.argv[1], f"replica-{rank}"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)

launch_processes(2, sleep_forever)
"""


def test_chief_result_and_an_error_that_does_not_pickle(tmp_path):
    outcome = run_fresh(RESULTS)
    assert outcome["result"] == {"rank": 0, "shared_scratch": True}
    assert outcome["error"] == ["RuntimeError", "Unpicklable: held a lock",
                                "raised in replica process 2:"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_replicas_die_when_the_launching_process_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    launcher = subprocess.Popen([sys.executable, "-c", ORPHANS, str(tmp_path)], env=env)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(path.read_text()) for path in tmp_path.iterdir()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), json.dumps(pids)


SELF_LAUNCHED = r"""
import json, os, sys
import torch_xla.distributed.xla_multiprocessing as xmp
from helpers import child_pids, make_data, make_estimator

def _mp_fn(index, model_dir):
    from torch_tpu_estimator.runtime.xla_mp import launched_by_xmp_spawn
    estimator = make_estimator(model_dir)
    estimator.train(lambda params: make_data(32), steps=4)
    metrics = estimator.evaluate(lambda params: make_data(16))
    predictions = list(estimator.predict(lambda params: make_data(5)))
    print(json.dumps({"self_launched": launched_by_xmp_spawn(), "step": int(metrics["global_step"]),
                      "predictions": len(predictions),
                      "caller_is_replica": estimator.topology.caller_is_replica,
                      "processes": estimator.topology.num_processes, "children": child_pids()}))

xmp.spawn(_mp_fn, args=(sys.argv[1],), nprocs=1)
"""


def test_a_script_that_launches_itself_with_xmp_spawn_is_one_replica(tmp_path):
    """The torch_xla convention: xmp.spawn(_mp_fn), the estimator built inside _mp_fn. The
    spawned process is recognised as a replica, as under torchrun: nothing is spawned again."""
    outcome = run_fresh(SELF_LAUNCHED, tmp_path)
    assert outcome == {"self_launched": True, "step": 4, "predictions": 5,
                       "caller_is_replica": True, "processes": 1, "children": []}
