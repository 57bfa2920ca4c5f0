"""The CPU backend's Ray start (``cpu_backend.ray_setup.ray_init``) retries a local start once when Ray's
start-up fails its fixed limits, after shutting down what the failed attempt started; other errors propagate
untouched. ``ray.init`` is replaced by a fake here: no Ray starts."""

import importlib
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from dynamo_openrlhf.cpu_backend import ray_setup  # noqa: E402

# ray.init's message when the raylet does not register with the GCS in time (Ray 2.55, ray/_private/node.py)
RAYLET_TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet "
                  "failed to startup or the GCS has become overloaded.")


STARTED = []  # every child process a test started (the fixture stops what is left)


def _sleeper() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    STARTED.append(proc)
    return proc


class FakeInit:
    """``ray.init`` that raises ``errors[i]`` on call i (None: succeed, returning ``"ctx"``); each failing call
    first starts a child process, as a half-started Ray leaves its GCS / raylet behind."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = []
        self.started = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        error = self.errors[len(self.calls) - 1]
        if error is None:
            return "ctx"
        self.started.append(_sleeper())
        raise error


@pytest.fixture
def local_ray(monkeypatch):
    """RAY_ADDRESS=local (ray_init starts a cluster, connects to none) and ray.shutdown counted. Every child
    process a test starts is gone afterwards, also when it fails."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    yield shutdowns
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    STARTED.clear()


def test_a_start_failure_is_retried_once_after_stopping_what_it_started(monkeypatch, local_ray, capsys):
    fake = FakeInit(Exception(RAYLET_TIMEOUT), None)
    monkeypatch.setattr(ray, "init", fake)
    before = _sleeper()  # a child that was there before: left alone
    ctx = ray_setup.ray_init({"env_vars": {"A": "1"}}, cpu_backend=True, num_gpus=3)
    assert ctx == "ctx"
    assert len(fake.calls) == 2 and fake.calls[0] == fake.calls[1]  # the same arguments both times
    assert fake.calls[0]["num_gpus"] == 3 and fake.calls[0]["include_dashboard"] is False
    assert fake.calls[0]["runtime_env"]["env_vars"]["A"] == "1"
    assert local_ray == [1]
    assert fake.started[0].poll() is not None  # the failed attempt's process was stopped
    assert before.poll() is None
    err = capsys.readouterr().err.splitlines()
    assert err == ["dynamo_openrlhf: Ray failed to start (Exception: The current node timed out during startup. "
                   "This could happen because some of the raylet failed to startup or the GCS has become "
                   "overloaded.); shutting down what it started and retrying once"]


def test_the_gcs_start_failure_is_retried_too(monkeypatch, local_ray, capsys):
    fake = FakeInit(RuntimeError("Failed to start GCS.  Last 0 lines of error files:\n\n."), None)
    monkeypatch.setattr(ray, "init", fake)
    assert ray_setup.ray_init(cpu_backend=False) == "ctx"
    assert len(fake.calls) == 2 and local_ray == [1]
    assert capsys.readouterr().err.count("Ray failed to start (RuntimeError: Failed to start GCS.") == 1


def test_a_second_start_failure_propagates(monkeypatch, local_ray):
    fake = FakeInit(Exception(RAYLET_TIMEOUT), Exception(RAYLET_TIMEOUT), None)
    monkeypatch.setattr(ray, "init", fake)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_setup.ray_init(cpu_backend=True, num_gpus=1)
    assert len(fake.calls) == 2 and local_ray == [1]


@pytest.mark.parametrize("error", [
    ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided."),
    TypeError("init() got an unexpected keyword argument 'bogus'"),
    RuntimeError("Maybe you called ray.init twice by accident?"),  # a RuntimeError that is no start failure
    Exception("some other failure"),  # a bare Exception without the start-up message
    TimeoutError("The current node timed out during startup"),  # right words, other type
])
def test_other_errors_are_not_retried(monkeypatch, local_ray, capsys, error):
    fake = FakeInit(error, None)
    monkeypatch.setattr(ray, "init", fake)
    with pytest.raises(type(error)) as raised:
        ray_setup.ray_init(cpu_backend=True, num_gpus=1)
    assert raised.value is error
    assert len(fake.calls) == 1 and local_ray == []
    assert "Ray failed to start" not in capsys.readouterr().err


def test_connecting_to_a_cluster_is_not_retried(monkeypatch, local_ray):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    fake = FakeInit(Exception(RAYLET_TIMEOUT), None)
    monkeypatch.setattr(ray, "init", fake)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_setup.ray_init(cpu_backend=True, num_gpus=1)
    assert len(fake.calls) == 1 and local_ray == []


def test_workers_find_the_setup_hook_by_its_path(monkeypatch, local_ray):
    """The runtime env names the worker setup hook by a path each Ray worker imports."""
    fake = FakeInit(None)
    monkeypatch.setattr(ray, "init", fake)
    ray_setup.ray_init(cpu_backend=True, num_gpus=1)
    path = fake.calls[0]["runtime_env"]["worker_process_setup_hook"]
    module, _, name = path.rpartition(".")
    from dynamo_openrlhf import cpu_backend

    assert getattr(importlib.import_module(module), name) is cpu_backend.setup_ray_worker
    assert fake.calls[0]["runtime_env"]["env_vars"][cpu_backend.BACKEND_ENV] == "cpu"
