"""Every error class pickles and copies with its attributes (errors cross process and thread boundaries)."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest

import llamaproc.errors as exceptions
from llamaproc.errors import LlamaprocError

# One instance of each class, made as llamaproc makes them (keyword arguments included).
SAMPLES: dict[str, Any] = {
    "LlamaprocError": lambda cls: cls("something failed"),
    "ServerError": lambda cls: cls("malformed answer"),
    "TransportError": lambda cls: cls("timed out"),
    "StatusError": lambda cls: cls(400, {"error": {"code": 400, "message": "bad n_probs"}}, url="http://h/completion"),
    "ServerLoadingError": lambda cls: cls(503, {"error": {"message": "Loading model"}}),
    "StreamError": lambda cls: cls({"error": {"code": 500, "message": "slot released"}}),
    "IncompleteStreamError": lambda cls: cls("the stream ended without its final event"),
    "StalledError": lambda cls: cls("llama-server sent nothing for 30 s and used no CPU time: it hangs"),
    "ProcessError": lambda cls: cls("survived SIGKILL"),
    "BinaryNotFoundError": lambda cls: cls("no llama-server", searched=["PATH", "/opt/bin"]),
    "_ExitedError": lambda cls: cls("exited", returncode=1, output="E bad", pid=7),
    "StartupError": lambda cls: cls("exited with code 1", returncode=1, output="E invalid magic", pid=12),
    "StartupTimeoutError": lambda cls: cls("no progress", returncode=None, output="loading", pid=13),
    "ServerCrashedError": lambda cls: cls("exited with code -9", returncode=-9, output="tail", pid=14),
    "ServerHungError": lambda cls: cls("killed", reason="3 failed health checks", returncode=-9, output="", pid=15),
    "WorkerError": lambda cls: cls("rpc-server could not start", address="127.0.0.1:50052"),
    "WorkerUnreachableError": lambda cls: cls("no answer within 1 s", address="10.0.0.2:50052"),
    "WorkerBusyError": lambda cls: cls("serves another model", address="10.0.0.3:50052"),
    "WorkersLostError": lambda cls: cls("1 of 2 workers left", lost=["10.0.0.2:50052"], address="10.0.0.2:50052"),
    "ModelFileError": lambda cls: cls("not a GGUF file"),
    "ConfigError": lambda cls: cls("bad key", path="/etc/serve.toml", problems=("a: bad", "b: worse")),
    "AlreadyRunningError": lambda cls: cls(Path("/run/llamaproc.pid"), 99),
    "ListenError": lambda cls: cls("127.0.0.1:8484", OSError(98, "Address already in use")),
    "LedgerError": lambda cls: cls("cannot open the ledger database"),
    "LeaseTimeoutError": lambda cls: cls("no memory", memory=2**30, free=2**20, capacity=2**31, device="gpu0"),
    "InsufficientMemoryError": lambda cls: cls("nothing fits", memory=2**30, free=2**20, device="cpu"),
    "LeaseLostError": lambda cls: cls("lease expired"),
    "PoolError": lambda cls: cls("pool"),
    "ModelNotFoundError": lambda cls: cls("no model 'x'"),
    "ModelUnavailableError": lambda cls: cls("failed"),
    "QueueFullError": lambda cls: cls("queue full", retry_after=2.5),
    "RolloutError": lambda cls: cls("model 'm': rolled back to the previous config: the new replica failed"),
    "ShuttingDownError": lambda cls: cls("draining"),
    "DaemonError": lambda cls: cls("socket"),
    "DaemonNotRunningError": lambda cls: cls("no daemon"),
    "DaemonRequestError": lambda cls: cls({"code": "queue_full", "message": "busy", "retry_after": 1.0}),
    "UsageError": lambda cls: cls("misuse"),
    "ClosedError": lambda cls: cls("the model is closed"),
    "InvalidArgumentError": lambda cls: cls("parallel must be at least 1, not 0", param="parallel"),
}

CLASSES = {
    name: obj
    for name, obj in vars(exceptions).items()
    if inspect.isclass(obj) and issubclass(obj, LlamaprocError)
}


def test_every_class_has_a_sample() -> None:
    assert set(CLASSES) == set(SAMPLES)


def _same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert str(a) == str(b)
    assert a.args == b.args
    assert vars(a) == vars(b)


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(name: str, protocol: int) -> None:
    error = SAMPLES[name](CLASSES[name])
    _same(error, pickle.loads(pickle.dumps(error, protocol=protocol)))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_copy_and_deepcopy(name: str) -> None:
    error = SAMPLES[name](CLASSES[name])
    _same(error, copy.copy(error))
    _same(error, copy.deepcopy(error))


def test_attributes_survive() -> None:
    error = pickle.loads(pickle.dumps(exceptions.StatusError(404, {"error": {"message": "nope"}}, url="http://h/x")))
    assert (error.status_code, error.message, error.url) == (404, "nope", "http://h/x")
    crashed = pickle.loads(pickle.dumps(exceptions.ServerCrashedError("died", returncode=-9, output="tail", pid=5)))
    assert (crashed.returncode, crashed.output, crashed.pid) == (-9, "tail", 5)
    assert isinstance(crashed, exceptions.ProcessError)
