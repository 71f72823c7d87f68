"""The ``llamaproc serve`` configuration file.

A TOML file with a few daemon-wide settings and one ``[models.NAME]`` table
per model::

    max_loaded_models = 2
    memory_budget = "8GiB"
    idle_timeout = "5m"
    api_keys = ["a-long-random-key"]

    [models.tiny]
    path = "models/tiny.gguf"
    parallel = 2

    [models.big]                   # sharded over rpc workers
    path = "models/big.gguf"
    workers = ["10.0.0.2:50052", "10.0.0.3:50052"]
    split = [3, 1]

:func:`load_config` reads and validates it into a frozen :class:`ServeConfig`;
it also reads the same config written as a serving spec (YAML documents, see
``_spec.py``).
Durations are stored as float seconds (``None`` when disabled) and sizes as
int bytes. Every problem in the file is reported at once, one line each, as a
:class:`ConfigError` naming the file and the dotted key path.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, InvalidArgumentError
from ..ledger import PRIORITIES, Priority
from ..ledger import parse_duration as _parse_duration
from ..ledger import parse_size as _parse_size

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ServeConfig",
    "load_config",
    "normal_worker_address",
    "parse_api_keys",
    "parse_duration",
    "parse_size",
    "redacted",
    "shard_options",
]


# --- durations and sizes -------------------------------------------------------------------------

def parse_duration(value: str | float) -> float | None:
    """Parse a duration into seconds; ``None`` means disabled (the ledger's parser: ``30``, ``"5m"``, ``"1h30m"``).

    ``0``, any zero duration and ``"never"`` disable. Raises
    :class:`ConfigError` (a ``ValueError``) for anything else.
    """
    try:
        return _parse_duration(value)
    except InvalidArgumentError as e:
        raise ConfigError(str(e)) from None


def parse_size(value: str | int) -> int:
    """Parse a byte size into int bytes (the ledger's parser: bytes, or ``"512MiB"``, ``"1.5GB"`` ...).

    Raises :class:`ConfigError` (a ``ValueError``) for anything else.
    """
    try:
        return _parse_size(value)
    except InvalidArgumentError as e:
        raise ConfigError(str(e)) from None


def _optional_duration(value: Any) -> float | None:
    return None if value is None else parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds is None:
        raise ConfigError(f"invalid duration {value!r}: must be greater than zero")
    return seconds


def _size(value: Any) -> int:
    return parse_size(value)


def _path(value: Any) -> Any:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError("Input should be a valid string")
    return value


def _override_duration(value: Any) -> float:
    seconds = parse_duration(value)
    return math.inf if seconds is None else seconds


_OptionalDuration = Annotated[float | None, BeforeValidator(_optional_duration)]
#: A model's own value of a daemon-wide duration: absent means the daemon's; "never" (or 0) is ``inf``.
_OverrideDuration = Annotated[float, BeforeValidator(_override_duration)]
_PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]

_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _check_model_name(name: str) -> str:
    if not _MODEL_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid model name {name!r}: must start with a letter or digit"
            " and contain only letters, digits, '.', '_', ':' or '-'"
        )
    return name


_ModelName = Annotated[StrictStr, AfterValidator(_check_model_name)]


# --- the HTTP front end: API keys, hosts, origins ------------------------------------------------

#: Visible ASCII but the comma (``LLAMAPROC_API_KEYS`` is a comma-separated list): what an
#: ``Authorization: Bearer`` header can carry as is.
_API_KEY_RE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_HOST_NAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*)(\.[a-z0-9_]([a-z0-9_-]*))*")
_ORIGIN_RE = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[^/:\[\]]+)(?::(\d{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _check_api_key(key: str) -> None:
    # The messages never repeat the key: a config error may end up in a log.
    if not _API_KEY_RE.fullmatch(key):
        raise ConfigError(
            "invalid API key: must be non-empty and contain only visible ASCII characters (no spaces or commas)"
        )


def _api_key(value: Any) -> Any:
    if not isinstance(value, str):
        raise ConfigError("Input should be a valid string")
    _check_api_key(value)
    return value


def parse_api_keys(text: str) -> tuple[SecretStr, ...]:
    """The API keys of a comma-separated list (``LLAMAPROC_API_KEYS``); blanks around them are ignored.

    Raises :class:`ConfigError` for a key that is not visible ASCII, without repeating it.
    """
    keys = []
    for number, part in enumerate(text.split(","), 1):
        key = part.strip()
        if not key:
            continue
        try:
            _check_api_key(key)
        except ConfigError as exc:
            raise ConfigError(f"key {number}: {exc}") from None
        keys.append(SecretStr(key))
    return tuple(keys)


def _normal_host(text: str) -> str | None:
    """``text`` as a lower-case host name, a dotted IPv4 address or a bracketed IPv6 one; None if it is none."""
    text = text.lower().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        brackets = True
    else:
        brackets = False
    if ":" in text:
        try:
            return f"[{ipaddress.IPv6Address(text).compressed}]"
        except ValueError:
            return None
    if brackets or not _HOST_NAME_RE.fullmatch(text):
        return None
    return text


def _allowed_host(value: Any) -> Any:
    if not isinstance(value, str):
        raise ConfigError("Input should be a valid string")
    if value == "*":
        return value
    host = _normal_host(value)
    if host is None:
        hint = " without a port (any port is accepted)" if re.fullmatch(r"[^:]+:\d+|\[.*\]:\d+", value) else ""
        raise ConfigError(
            f"invalid host {value!r}: expected a host name or an IP address{hint}, e.g. 'llm.example.com', or '*'"
        )
    return host


def _allowed_origin(value: Any) -> Any:
    if not isinstance(value, str):
        raise ConfigError("Input should be a valid string")
    if value == "*":
        return value
    match = _ORIGIN_RE.fullmatch(value.lower())
    host = _normal_host(match.group(2)) if match else None
    port = int(match.group(3)) if match and match.group(3) else None
    if match is None or host is None or (port is not None and not 0 < port < 65536):
        raise ConfigError(
            f"invalid origin {value!r}: expected 'scheme://host[:port]' (http or https, no path),"
            " e.g. 'https://app.example.com', or '*'"
        )
    scheme = match.group(1)
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


_ApiKey = Annotated[SecretStr, BeforeValidator(_api_key)]
_AllowedHost = Annotated[str, BeforeValidator(_allowed_host)]
_AllowedOrigin = Annotated[str, BeforeValidator(_allowed_origin)]


# --- sharded models: rpc workers -----------------------------------------------------------------

#: ``host:port`` or ``[v6]:port``.
_WORKER_RE = re.compile(r"(\[[^\[\]]+\]|[^:\[\]]+):([0-9]{1,5})")
#: ``workers = "registered"``: the daemon's ready registered workers when the model loads.
REGISTERED = "registered"


def normal_worker_address(address: str) -> str | None:
    """An rpc worker's ``host:port`` (or ``[v6]:port``) in a normal form (lower-case host, compressed IPv6);
    ``None`` if it is not one (a bad host, or a port outside 1..65535)."""
    match = _WORKER_RE.fullmatch(address)
    if match is None:
        return None
    port = int(match.group(2))
    host = _normal_host(match.group(1))
    if host is None or not 0 < port < 65536 or (host.startswith("[") != match.group(1).startswith("[")):
        return None
    return f"{host}:{port}"


def _worker_address(value: Any) -> Any:
    if not isinstance(value, str):
        raise ConfigError("Input should be a valid string")
    if normal_worker_address(value) is None:
        raise ConfigError(
            f"invalid worker address {value!r}: expected 'host:port' or '[v6]:port' with a port in 1..65535,"
            " e.g. '10.0.0.2:50052'"
        )
    return value


def _split_weight(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("Input should be a number")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid weight {value!r}: must be a finite number >= 0")
    return float(value)


def _split(value: Any) -> Any:
    if isinstance(value, str):
        if value not in ("capacity", "uniform"):
            raise ConfigError(f"invalid split {value!r}: expected 'capacity', 'uniform' or a list of weights")
        return value
    if not isinstance(value, (list, tuple)):
        raise ConfigError("invalid split: expected 'capacity', 'uniform' or a list of weights")
    return value


_WorkerAddress = Annotated[str, BeforeValidator(_worker_address)]
_Weight = Annotated[float, BeforeValidator(_split_weight)]
_Split = Annotated[
    Annotated[Literal["capacity", "uniform"], Tag("<name>")] | Annotated[tuple[_Weight, ...], Tag("<weights>")],
    Discriminator(lambda value: "<name>" if isinstance(value, str) else "<weights>"),
    BeforeValidator(_split),
]


def _workers_kind(value: Any) -> str:
    return "<registered>" if isinstance(value, str) else "<addresses>"


def _workers(value: Any) -> Any:
    if isinstance(value, str):
        if value != REGISTERED:
            raise ConfigError(
                f"invalid workers {value!r}: expected a list of 'host:port' addresses or the string 'registered'"
            )
    elif not isinstance(value, (list, tuple)):
        raise ConfigError("invalid workers: expected a list of 'host:port' addresses or the string 'registered'")
    return value


#: The tags (``<...>``: never a key or a model name) are dropped from the dotted paths of errors.
_Workers = Annotated[
    Annotated[tuple[_WorkerAddress, ...], Tag("<addresses>")] | Annotated[Literal["registered"], Tag("<registered>")],
    Discriminator(_workers_kind),
    BeforeValidator(_workers),
]


# --- the memory ledger ---------------------------------------------------------------------------


def _priority(value: Any) -> Any:
    if value not in PRIORITIES:
        raise ConfigError(f"invalid priority {value!r}: expected one of {', '.join(PRIORITIES)}")
    return value


def _device(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise ConfigError(f"invalid device {value!r}: expected a name such as 'cpu' or 'gpu0'")
    return value


_Priority = Annotated[Priority, BeforeValidator(_priority)]
_Device = Annotated[str, BeforeValidator(_device)]


def _ledger_url(value: Any, info: ValidationInfo) -> Any:
    """A ``sqlite://`` URL with its path made absolute (against the config file's directory), or a Redis one."""
    if not isinstance(value, str):
        raise ConfigError("Input should be a valid string")
    if value.startswith("sqlite://"):
        path = value[len("sqlite://") :]
        if not path:
            raise ConfigError(f"invalid ledger {value!r}: no file, e.g. 'sqlite:///var/lib/llamaproc/ledger.db'")
        return "sqlite://" + str(_absolute(Path(path), info))
    if value.startswith(("redis://", "rediss://", "unix://")):
        return value
    raise ConfigError(f"invalid ledger {value!r}: expected 'sqlite:///path/ledger.db' or 'redis://host:port/db'")


def redacted(url: str) -> str:
    """A ledger URL without the password a Redis URL may carry (``redis://:***@host:6379/0``), for logs and answers."""
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    return f"{scheme}{sep}***@{where}" if at and credentials else url


def _capacity(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise ConfigError("invalid ledger_capacity: expected a table of device = size, e.g. {cpu = \"16GiB\"}")
    return value


_PositiveSize = Annotated[int, BeforeValidator(lambda v: parse_size(v)), Field(gt=0)]


# --- models --------------------------------------------------------------------------------------


class ModelConfig(BaseModel):
    """One ``[models.NAME]`` table: a GGUF file and how to run llama-server on it.

    ``path`` is made absolute (``~`` expanded, relative paths against the config
    file's directory when loaded by :func:`load_config`, else the current
    directory); :func:`load_config` also checks that it is an existing file.
    ``binary`` is resolved the same way when it contains a ``/`` or starts with
    ``~``; a bare name is left for a ``PATH`` search.

    ``replicas`` (1): how many llama-servers of the model serve it, requests
    going to the one with the fewest in flight (a sharded model has one in the
    daemon; a spec rendered for Kubernetes runs its replicas as pods or
    groups). ``progress_deadline`` (600 s): how long a new replica of a
    rolling update may take to serve before the update is rolled back.
    ``recovery_policy``: ``"Restart"`` (default) restarts a crashed
    model with backoff; ``"None"`` marks it Failed at its first crash or failed
    load. ``restart_grace_period``: seconds a stopping llama-server (unloaded,
    replaced or restarted) gets between SIGTERM and SIGKILL (default: the
    library's 5 s).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[Path, BeforeValidator(_path)]
    parallel: StrictInt = Field(default=1, ge=1)
    ctx_size: StrictInt | None = Field(default=None, ge=0)
    gpu_layers: StrictInt | None = Field(default=None, ge=-1)
    threads: StrictInt | None = Field(default=None, ge=1)
    embeddings: StrictBool = False
    args: tuple[StrictStr, ...] = ()
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    binary: StrictStr | None = None
    stall_timeout: _OverrideDuration | None = None
    workers: _Workers | None = None
    local_workers: StrictInt | None = Field(default=None, ge=0)
    split: _Split | None = None
    min_workers: StrictInt | None = Field(default=None, ge=0)
    max_reshards: StrictInt | None = Field(default=None, ge=0)
    priority: _Priority | None = None
    device: _Device = "cpu"
    replicas: StrictInt = Field(default=1, ge=1)
    recovery_policy: Literal["Restart", "None"] = "Restart"
    restart_grace_period: _PositiveDuration | None = None
    progress_deadline: _PositiveDuration = 600.0

    @property
    def sharded(self) -> bool:
        """Whether the model is split over rpc workers (``workers`` or ``local_workers`` is set)."""
        return self.workers is not None or self.local_workers is not None

    @property
    def worker_count(self) -> int | None:
        """How many workers the config fixes (listed, or ``local_workers``); None when unknown until load."""
        if isinstance(self.workers, tuple):
            return len(self.workers)
        return self.local_workers

    @field_validator("replicas")
    @classmethod
    def _one_sharded_replica(cls, value: int, info: ValidationInfo) -> int:
        # For the daemon's loaders (load_config, load_spec): `llamaproc render` reads specs without
        # this check (Kubernetes runs a sharded model's replicas as LeaderWorkerSet groups).
        sharded = info.data.get("workers") is not None or info.data.get("local_workers") is not None
        if value > 1 and sharded and _context(info).get("one_replica"):
            raise ConfigError(
                f"a sharded model runs one replica in llamaproc serve (got {value}): its rpc workers serve one"
                " llama-server at a time; `llamaproc render` runs more as LeaderWorkerSet groups"
            )
        return value

    @field_validator("workers")
    @classmethod
    def _no_duplicate_workers(cls, value: tuple[str, ...] | str | None) -> tuple[str, ...] | str | None:
        if isinstance(value, tuple):
            seen: dict[str, str] = {}
            for address in value:
                key = normal_worker_address(address) or address
                if key in seen:
                    raise ConfigError(f"worker {address!r} is listed twice (as {seen[key]!r} before)")
                seen[key] = address
        return value

    @field_validator("local_workers")
    @classmethod
    def _exclusive(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("workers") is not None:
            raise ConfigError("workers and local_workers exclude each other: set one of them")
        return value

    @field_validator("split", "min_workers", "max_reshards")
    @classmethod
    def _sharded_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or "workers" not in info.data or "local_workers" not in info.data:
            return value  # a bad workers or local_workers is a problem of its own
        workers, local = info.data["workers"], info.data["local_workers"]
        if workers is None and local is None:
            raise ConfigError(f"{info.field_name} is only for a sharded model: set workers or local_workers too")
        count = len(workers) if isinstance(workers, tuple) else local
        if info.field_name == "split" and isinstance(value, tuple):
            if not any(value):
                raise ConfigError("the weights of split must not all be zero")
            if count is not None and len(value) != count:
                raise ConfigError(f"split has {len(value)} weights for {count} workers: give one weight per worker")
        if info.field_name == "min_workers" and count is not None and value > count:
            raise ConfigError(f"min_workers ({value}) is more than the {count} workers the model has")
        return value

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: Path, info: ValidationInfo) -> Path:
        path = _absolute(value, info)
        if _context(info).get("check_paths"):
            if not path.exists():
                raise ConfigError(f"model file not found: {path}")
            if not path.is_file():
                raise ConfigError(f"model path is not a file: {path}")
        return path

    @field_validator("binary")
    @classmethod
    def _resolve_binary(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or ("/" not in value and not value.startswith("~")):
            return value
        return str(_absolute(Path(value), info))


class ServeConfig(BaseModel):
    """The whole serve config file. Durations are float seconds, sizes int bytes.

    ``max_loaded_models``: how many models may be loaded at once (default 1).
    ``memory_budget``: bytes the loaded models may use together (default ``None``: no budget).
    ``idle_timeout``: unload a model idle this long (default ``None``: never).
    ``queue_size``: requests that may wait per model beyond its slots (default 16).
    ``preload``: models to load at start-up. ``drain_timeout``: graceful shutdown
    deadline (30s). ``restart_backoff`` (0.5s) doubles after each crash up to
    ``restart_backoff_max`` (30s); more than ``max_restarts`` (5) restarts
    within ``restart_window`` (60s) marks the model failed.
    ``stall_timeout`` (30s): a running generation that receives nothing from
    its server for this long while the server uses no CPU fails, and the server
    is killed and restarted as hung ("never": no limit; a model's own
    ``stall_timeout`` overrides it). ``write_timeout`` (30s): how long a write to
    a client may block before the client counts as gone.

    The HTTP front end: ``api_keys``, when any is set, are required as
    ``Authorization: Bearer KEY`` on every route but ``GET /health`` (they are
    :class:`~pydantic.SecretStr`: never shown in a repr or a log).
    ``allowed_hosts``: ``Host`` names accepted besides the loopback ones
    (``"*"``: any). ``allowed_origins``: the ``scheme://host[:port]`` browser
    origins that may call the API (``"*"``: any). ``header_timeout`` (10s):
    how long a client may take to send a whole request head;
    ``body_timeout`` (30s): its whole body; ``max_connections`` (1024):
    open HTTP connections beyond which new ones are refused at once.

    ``max_reshards`` (3): how many times a stream of a sharded model may
    recover from lost rpc workers before it fails (a model's own overrides it).

    The memory ledger shared with other processes (see :func:`~llamaproc.open_ledger`):
    ``ledger`` (``"sqlite:///path/ledger.db"``, a relative path being against the
    config file's directory, or ``"redis://host:port/db"``; default ``None``: no
    ledger) makes each model (but sharded ones, whose memory is on their
    workers) hold a lease on its ``device`` while it is loaded, at its
    ``priority`` (a model's own, else the daemon's, default ``"normal"``).
    ``ledger_capacity`` (``{cpu = "16GiB"}``) is written to the ledger at
    start-up; without it the stored (or detected) capacity is used.
    ``lease_timeout`` (60s): how long a request waits for its model's lease.
    ``preempt_grace`` (30s): how long a busy model asked to yield lets its
    requests in flight run before it is unloaded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_loaded_models: StrictInt = Field(default=1, ge=1)
    memory_budget: Annotated[int, BeforeValidator(_size), Field(gt=0)] | None = None
    idle_timeout: _OptionalDuration = None
    queue_size: StrictInt = Field(default=16, ge=0)
    drain_timeout: _PositiveDuration = 30.0
    restart_backoff: _PositiveDuration = 0.5
    restart_backoff_max: _PositiveDuration = 30.0
    max_restarts: StrictInt = Field(default=5, ge=0)
    restart_window: _PositiveDuration = 60.0
    stall_timeout: _OptionalDuration = 30.0
    write_timeout: _PositiveDuration = 30.0
    models: dict[_ModelName, ModelConfig] = Field(min_length=1)
    preload: tuple[StrictStr, ...] = ()
    api_keys: tuple[_ApiKey, ...] = ()
    allowed_hosts: tuple[_AllowedHost, ...] = ()
    allowed_origins: tuple[_AllowedOrigin, ...] = ()
    header_timeout: _PositiveDuration = 10.0
    body_timeout: _PositiveDuration = 30.0
    max_connections: StrictInt = Field(default=1024, ge=1)
    max_reshards: StrictInt = Field(default=3, ge=0)
    ledger: Annotated[str, BeforeValidator(_ledger_url)] | None = None
    ledger_capacity: Annotated[dict[_Device, _PositiveSize], BeforeValidator(_capacity)] | None = None
    priority: _Priority = "normal"
    lease_timeout: _PositiveDuration = 60.0
    preempt_grace: _PositiveDuration = 30.0

    @field_validator("preload")
    @classmethod
    def _preload_known(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        models = info.data.get("models")
        if models is None:  # already reported as a problem of its own
            return value
        for name in value:
            if name not in models:
                raise ConfigError(f"unknown model {name!r}{_suggest(name, models)}")
        return value

    @model_validator(mode="after")
    def _ledger_set(self) -> ServeConfig:
        if self.ledger_capacity is not None and self.ledger is None:
            raise ConfigError("ledger_capacity needs a ledger: set ledger = 'sqlite:///path/ledger.db' too")
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> ServeConfig:
        if self.restart_backoff_max < self.restart_backoff:
            raise ConfigError(
                f"restart_backoff_max ({self.restart_backoff_max:g}s)"
                f" must not be less than restart_backoff ({self.restart_backoff:g}s)"
            )
        return self


def shard_options(config: ServeConfig, name: str, *, workers: Sequence[str] | int | None = None) -> dict[str, Any]:
    """The keywords of a sharded :func:`~llamaproc.load_model` for model ``name``; ``{}`` for a model that is not sharded.

    They are ``workers``, ``split``, ``min_workers``, ``max_reshards`` and
    ``stall_timeout`` (the model's own values, else the daemon-wide ones or the
    defaults; ``stall_timeout`` ``None`` means no limit). ``workers`` gives the
    addresses the daemon resolved for ``workers = "registered"`` (it
    overrides a listed ``workers``), or for ``local_workers`` their number
    (the loaded model starts and owns them). Raises
    :class:`~llamaproc.errors.InvalidArgumentError` when the model needs
    resolved workers and none are given, or when a list ``split`` does not
    have one weight per worker.
    """
    model = config.models[name]
    if not model.sharded:
        return {}
    if workers is None:
        if not isinstance(model.workers, tuple):
            where = "local_workers" if model.local_workers is not None else 'workers = "registered"'
            raise InvalidArgumentError(
                f"model {name!r} has {where}: pass the addresses of its workers", param="workers"
            )
        workers = model.workers
    split = model.split if model.split is not None else "capacity"
    count = workers if isinstance(workers, int) else len(workers)
    if isinstance(split, tuple) and len(split) != count:
        raise InvalidArgumentError(
            f"model {name!r}: split has {len(split)} weights for {count} workers", param="split"
        )
    if model.stall_timeout is None:
        stall = config.stall_timeout
    else:
        stall = None if math.isinf(model.stall_timeout) else model.stall_timeout
    return {
        "workers": workers if isinstance(workers, int) else list(workers),
        "split": list(split) if isinstance(split, tuple) else split,
        "min_workers": model.min_workers if model.min_workers is not None else 1,
        "max_reshards": model.max_reshards if model.max_reshards is not None else config.max_reshards,
        "stall_timeout": stall,
    }


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


def _absolute(path: Path, info: ValidationInfo) -> Path:
    path = path.expanduser()
    if not path.is_absolute():
        path = Path(_context(info).get("base_dir") or Path.cwd()) / path
    return Path(os.path.abspath(path))


# --- loading -------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> ServeConfig:
    """Read, validate and return the serve config at ``path``.

    A ``.yaml`` or ``.yml`` file, or a TOML file of ``[[documents]]``, is a
    serving spec (see :func:`~llamaproc.runtime.load_spec`); any other file is
    the TOML config above. Raises :class:`ConfigError` for a missing or
    unreadable file, invalid TOML, and every invalid value, unknown key or
    missing model file, each reported as ``FILE: dotted.key: problem``.
    """
    from ._spec import SPEC_SUFFIXES, load_spec_data

    name = os.fspath(path)
    text = _read_text(path)
    if Path(name).suffix.lower() in SPEC_SUFFIXES:
        return load_spec_data(text, path=path, yaml=True)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        where = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", text)
        if where:
            message = f"{name}:{where[2]}:{where[3]}: invalid TOML: {where[1]}"
        else:  # pragma: no cover - tomllib always reports a position
            message = f"{name}: invalid TOML: {text}"
        raise ConfigError(message, path=path) from None
    if "documents" in data:
        return load_spec_data(data, path=path, yaml=False)
    try:
        return ServeConfig.model_validate(data, context=daemon_context(path))
    except ValidationError as exc:
        problems = tuple(f"{name}: {line}" for line in _problems(exc))
        raise ConfigError("\n".join(problems), path=path, problems=problems) from None


def daemon_context(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The validation context of the daemon's loaders: paths against the folder of the file at ``path``
    (no ``base_dir`` without one), model files that must exist, one replica per model."""
    context: dict[str, Any] = {"check_paths": True, "one_replica": True}
    if path is not None:
        context["base_dir"] = Path(os.path.abspath(path)).parent
    return context


def _read_text(path: str | os.PathLike[str]) -> str:
    """The text of a config file, or :class:`ConfigError` naming it."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found", path=path) from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc.strerror or exc}", path=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not valid UTF-8 (at byte {exc.start})", path=path) from None


#: Where a problem at a location of a validated value is reported: ``place(loc)`` gives a prefix for its
#: line, the location as the user wrote it, and the keys known at the parent of an unknown key (or None).
Place = Callable[[tuple[int | str, ...]], tuple[str, tuple[int | str, ...], list[str] | None]]


def _problems(exc: ValidationError, *, place: Place | None = None) -> list[str]:
    """One readable line per pydantic error: ``dotted.key: message``; ``place`` maps the locations."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(part for part in err["loc"] if part != "[key]" and not str(part).startswith("<"))
        prefix, known = "", None
        if place is not None:
            prefix, loc, known = place(loc)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            where = _dotted(loc[:-1])
            message = f"unknown key {key!r}{_suggest(key, known if known is not None else _known_keys(loc[:-1]))}"
        else:
            where = _dotted(loc)
            error = err.get("ctx", {}).get("error")
            message = str(error) if isinstance(error, ConfigError) else err["msg"]
        lines.append(prefix + (f"{where}: {message}" if where else message))
    return lines


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else '"' + part.replace('"', '\\"') + '"'
            text += f".{key}" if text else key
    return text


def _known_keys(parent: tuple[int | str, ...]) -> list[str]:
    if not parent:
        return list(ServeConfig.model_fields)
    if len(parent) == 2 and parent[0] == "models":
        return list(ModelConfig.model_fields)
    return []


def _suggest(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
