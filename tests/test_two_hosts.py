"""A job across two "hosts" on this machine: two torchrun agents (`--nnodes=2`, c10d
rendezvous on localhost, gloo), each with its own working directory and its own TMPDIR, sharing
nothing but a bucket model_dir on the session's S3 server. One host's agent is killed mid-run;
both restart and the job ends bit for bit like one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
from helpers import same_values
from test_random_input_resume import _final

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "random_input_job.py")
MAX_STEPS = 60
LEASE_SECONDS = 2.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_hosts(model_dir: str, root) -> list[subprocess.Popen]:
    """Both agents of one job, each in its own folder with its own temporary files."""
    port, job_id = _free_port(), uuid.uuid4().hex[:8]
    agents = []
    for host in (0, 1):
        folder = root / f"host{host}-{job_id}"
        (folder / "tmp").mkdir(parents=True)
        env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=HERE, TMPDIR=str(folder / "tmp"),
                   TORCH_TPU_ESTIMATOR_LEASE_SECONDS=str(LEASE_SECONDS))
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc_per_node=1", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={job_id}",
                   "--max_restarts=0", JOB, model_dir, "torchrun", str(MAX_STEPS)]
        agents.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       start_new_session=True))
    return agents


def _kill_host(agent: subprocess.Popen) -> None:
    """SIGKILLs a host: its agent and every process under it (torchrun starts its workers in
    sessions of their own, so the agent's process group alone would leave them running)."""
    def descendants(pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                children = [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            return []
        return [found for child in children for found in [child, *descendants(child)]]

    for pid in [agent.pid, *descendants(agent.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(agents: list[subprocess.Popen]) -> None:
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]


def _published_step(model_dir: str) -> int:
    try:
        index = json.loads(fsspec.filesystem("s3", skip_instance_cache=True,
                                             use_listings_cache=False).cat_file(
            f"{model_dir}/checkpoint.json"))
    except FileNotFoundError:
        return 0
    return int(index["latest"].split("-")[1].split(".")[0]) if index["latest"] else 0


def test_a_two_host_job_killed_on_one_host_resumes_from_the_bucket_bit_for_bit(
        tmp_path, bucket):
    uninterrupted = _start_hosts(f"{bucket}/uninterrupted", tmp_path)  # alongside
    model_dir = f"{bucket}/killed"
    agents = _start_hosts(model_dir, tmp_path)
    deadline = time.monotonic() + 300
    while _published_step(model_dir) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_host(agents[1])  # one host goes away, its agent and its worker
    for agent in agents:
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:  # the other host's worker waits on its peer
            _kill_host(agent)
            agent.wait()
    killed_at = _published_step(model_dir)
    assert 12 <= killed_at < MAX_STEPS
    _finish(uninterrupted)
    time.sleep(LEASE_SECONDS + 0.2)  # the killed chief's lease lapses, if host 1 held it

    _finish(_start_hosts(model_dir, tmp_path))
    assert same_values(_final(model_dir, MAX_STEPS), _final(f"{bucket}/uninterrupted", MAX_STEPS))
