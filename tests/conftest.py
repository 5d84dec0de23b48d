"""Every test runs XLA on the CPU backend unless it starts its own subprocess."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "1")

# Autograd's engine sizes its device queues at the first backward pass: a test that runs one on
# the CPU before the XLA runtime starts would leave XLA backward impossible in this worker.
# (SPMD, which must start before any device use, runs in tests' own subprocesses.)
import torch_xla  # noqa: E402

torch_xla.device()


import logging  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 server on localhost for the session (moto's server mode: real HTTP, conditional
    writes), with the environment s3fs, boto3 and subprocesses use to reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in _S3_ENVIRONMENT}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def bucket(s3_endpoint):
    """A new, empty bucket on the session's S3 server: its s3:// URL."""
    import fsspec

    name = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


# The files whose tests run longest (SIGKILL fuzz, multi-process jobs), started first so that
# the two workers of `pytest -n 2 --dist loadfile` share them instead of one worker ending the
# suite alone with the last of them.
LONGEST_FIRST = ("test_random_input_resume.py", "test_object_storage_faults.py",
                 "test_random_input_resume_torch.py", "test_random_input_resume_replay.py",
                 "test_replicas.py", "test_two_hosts.py", "test_preemption.py",
                 "test_big_models.py", "test_ported_examples.py", "test_docs.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept
