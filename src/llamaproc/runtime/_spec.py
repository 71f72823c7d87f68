"""Serving specs: the serve config as Kubernetes-style documents, in YAML (or TOML).

A spec holds one ``kind: ModelServing`` document per model and at most one
``kind: ServeConfig`` document with the daemon-wide settings::

    apiVersion: llamaproc/v1
    kind: ServeConfig
    spec: {maxLoadedModels: 2, memoryBudget: 8GiB, idleTimeout: 5m}
    ---
    apiVersion: llamaproc/v1
    kind: ModelServing
    metadata: {name: chat}
    spec:
      model: {path: models/chat.gguf, ctxSize: 4096, parallel: 4}
      recoveryPolicy: Restart            # or None: a failed model stays Failed
      restartGracePeriodSeconds: 30
      roles:
        server: {replicas: 1}            # llama-server alone
        # sharded: {replicas: 1, workerReplicas: 2}   # llama-server over rpc workers
      resources: {memory: 2GiB, device: cpu, priority: normal}

The keys are the camelCase spellings of the TOML config's: a
:class:`ServeConfig` field in the ``ServeConfig`` document's ``spec``, a
:class:`ModelConfig` field under ``spec.model``, with the same values. The
model's name is ``metadata.name``. ``roles`` holds one role: ``server`` (the
default) or ``sharded``, whose ``workerReplicas`` is the config's
``local_workers`` and whose ``workers`` is its ``workers``; the role's
``replicas`` is the config's ``replicas``. ``recoveryPolicy`` and
``restartGracePeriodSeconds`` are ``recovery_policy`` and
``restart_grace_period``. ``resources`` is for ``llamaproc render`` (a pod's
memory request and limit, its device), and its ``device`` and ``priority``
are the config's (the model's lease in the memory ledger).

In TOML the documents are an array of tables, ``[[documents]]``, with the same
keys. :func:`load_spec` reads a spec into a :class:`ServeConfig`;
:func:`config_to_spec` writes one back as documents. Every problem is reported
at once, one line each, naming the document (its number and name), the key
path as written and the reason.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ..errors import ConfigError
from ..ledger import Priority
from ._config import (
    ModelConfig,
    ServeConfig,
    _dotted,
    _problems,
    _read_text,
    _size,
    _suggest,
    daemon_context,
)

__all__ = [
    "API_VERSION",
    "SPEC_SUFFIXES",
    "Resources",
    "ServingSpec",
    "config_to_spec",
    "load_spec",
    "load_spec_data",
    "read_spec",
]

#: The ``apiVersion`` of every document.
API_VERSION = "llamaproc/v1"
#: The file suffixes :func:`~llamaproc.runtime.load_config` reads as YAML specs.
SPEC_SUFFIXES = (".yaml", ".yml")

#: ModelConfig fields that a role carries (``spec.roles.ROLE``) rather than ``spec.model``.
_ROLE_FIELDS = ("replicas", "local_workers", "workers")
#: ModelConfig fields spelled in ``spec.resources``.
_RESOURCE_FIELDS = ("priority", "device")
#: ModelConfig fields spelled at the level of ``spec``.
_SPEC_FIELDS = {
    "recovery_policy": "recoveryPolicy",
    "restart_grace_period": "restartGracePeriodSeconds",
    "progress_deadline": "progressDeadlineSeconds",
}
#: ``spec.model``'s keys: camelCase → ModelConfig field.
_MODEL_KEYS = {
    to_camel(f): f
    for f in ModelConfig.model_fields
    if f not in _ROLE_FIELDS and f not in _SPEC_FIELDS and f not in _RESOURCE_FIELDS
}
#: The ServeConfig document's keys: camelCase → ServeConfig field.
_SETTINGS_KEYS = {to_camel(f): f for f in ServeConfig.model_fields if f != "models"}

Loc = tuple[int | str, ...]

#: A config key in a message (``min_workers (3) is more than ...``), to be spelled as a spec spells it.
#: Not a part of a path, a name or a quoted value.
_SNAKE_RE = re.compile(r"(?<![\w/.'\"-])[a-z]+(?:_[a-z]+)+(?![\w/.'\"-])")
_SPELLING = {
    **{field: key for key, field in _MODEL_KEYS.items()},
    **{field: key for key, field in _SETTINGS_KEYS.items()},
    **_SPEC_FIELDS,
    "local_workers": "workerReplicas",
}


def _spelled(match: re.Match[str]) -> str:
    return _SPELLING.get(match[0], match[0])


# --- the documents' shapes -----------------------------------------------------------------------


def _device(value: Any) -> Any:
    if isinstance(value, str) and not (value and value.isascii() and value.replace("-", "").isalnum()):
        raise ConfigError(f"invalid device {value!r}: expected 'cpu' or an accelerator's name, e.g. 'gpu0'")
    return value


class Resources(BaseModel):
    """What one pod of a model asks of its node (``spec.resources``), for ``llamaproc render``.

    ``memory``: bytes (``"2GiB"`` in a spec), the pod's memory request and
    limit (``None``: neither). ``device``: ``"cpu"`` (default) or an
    accelerator (``"gpu"``, ``"gpu0"``...): anything but ``"cpu"`` asks for one
    accelerator; it is also the device of the model's lease in the daemon's
    memory ledger (the config's ``device``). ``priority``: the priority of
    that lease (``urgent`` ... ``batch``; the config's ``priority``, when
    given).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: Annotated[int, BeforeValidator(_size), Field(gt=0)] | None = None
    device: Annotated[StrictStr, BeforeValidator(_device)] = "cpu"
    priority: Priority = "normal"


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr


class _Server(BaseModel):
    """``roles.server``: llama-server alone. ``replicas`` is checked as the config's."""

    model_config = ConfigDict(extra="forbid")

    replicas: Any = 1


class _Sharded(BaseModel):
    """``roles.sharded``: llama-server over rpc workers, ``workerReplicas`` of them or the listed ``workers``."""

    model_config = ConfigDict(extra="forbid")

    replicas: Any = 1
    workerReplicas: Any = None
    workers: Any = None

    @model_validator(mode="after")
    def _one_kind_of_workers(self) -> _Sharded:
        given = [key for key in ("workerReplicas", "workers") if getattr(self, key) is not None]
        if not given:
            raise ConfigError("a sharded role needs workerReplicas (a number) or workers (addresses or 'registered')")
        if len(given) == 2:
            raise ConfigError("workerReplicas and workers exclude each other: give one of them")
        return self


class _Roles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: _Server | None = None
    sharded: _Sharded | None = None

    @model_validator(mode="after")
    def _one_role(self) -> _Roles:
        if (self.server is None) == (self.sharded is None):
            raise ConfigError("give exactly one role: server (llama-server alone) or sharded (over rpc workers)")
        return self

    @property
    def name(self) -> Literal["server", "sharded"]:
        return "server" if self.server is not None else "sharded"


class _ModelServingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: dict[Any, Any]
    roles: _Roles = Field(default_factory=lambda: _Roles(server=_Server()))
    recoveryPolicy: Any = None
    restartGracePeriodSeconds: Any = None
    progressDeadlineSeconds: Any = None
    resources: Resources = Field(default_factory=Resources)


class _ModelServing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["llamaproc/v1"]
    kind: Literal["ModelServing"]
    metadata: _Metadata
    spec: _ModelServingSpec


class _ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["llamaproc/v1"]
    kind: Literal["ServeConfig"]
    metadata: _Metadata | None = None
    spec: dict[Any, Any] = Field(default_factory=dict)

    @field_validator("spec", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return {} if value is None else value


_KINDS: dict[str, type[_ModelServing] | type[_ServeSettings]] = {
    "ModelServing": _ModelServing,
    "ServeConfig": _ServeSettings,
}


class ServingSpec(BaseModel):
    """A spec as :func:`read_spec` reads it: the serve config and each model's resources (by model name)."""

    model_config = ConfigDict(frozen=True)

    config: ServeConfig
    resources: dict[str, Resources]


# --- reading -------------------------------------------------------------------------------------


class _Entry:
    """One document being read: its number (from 1), name, kind and where its problems are reported."""

    def __init__(self, number: int, name: str | None) -> None:
        self.number = number
        self.name = name
        self.role: Literal["server", "sharded"] = "server"

    @property
    def prefix(self) -> str:
        return f"document {self.number} ({self.name}): " if self.name else f"document {self.number}: "

    def model_path(self, field: str) -> Loc:
        """Where a ModelConfig field of this model is written in its document."""
        if field == "replicas":
            return ("spec", "roles", self.role, "replicas")
        if field == "local_workers":
            return ("spec", "roles", "sharded", "workerReplicas")
        if field == "workers":
            return ("spec", "roles", "sharded", "workers")
        if field in _SPEC_FIELDS:
            return ("spec", _SPEC_FIELDS[field])
        if field in _RESOURCE_FIELDS:
            return ("spec", "resources", field)
        return ("spec", "model", to_camel(field))


def _known_at(cls: type[BaseModel], loc: Loc) -> list[str] | None:
    """The keys a document class takes at ``loc`` (for suggesting one in place of an unknown key)."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        found = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        models = [a for a in found if issubclass(a, BaseModel)]
        if not models:
            return None
        cls = models[0]
    return list(cls.model_fields)


def _unknown_keys(mapping: Mapping[Any, Any], known: Mapping[str, str], where: Loc) -> list[tuple[Loc, str]]:
    return [
        (where, f"unknown key {str(key)!r}{_suggest(str(key), known)}")
        for key in mapping
        if key not in known
    ]


class _Reader:
    """Reads the documents of one spec into a ServeConfig, collecting every problem with its place."""

    def __init__(self, documents: list[tuple[int, Any]]) -> None:
        self.documents = documents
        self.lines: list[str] = []
        self.models: dict[str, _Entry] = {}
        self.settings: _Entry | None = None
        self.data: dict[str, Any] = {}
        self.resources: dict[str, Resources] = {}
        #: The document of each problem of the ServeConfig, in the order _place was asked (0: none).
        self.numbers: list[int] = []

    def problem(self, entry: _Entry | None, loc: Loc, message: str) -> None:
        where = _dotted(loc)
        self.lines.append((entry.prefix if entry else "") + (f"{where}: {message}" if where else message))

    def read(self, context: dict[str, Any]) -> tuple[ServeConfig, dict[str, Resources]]:
        models: dict[str, Any] = {}
        for number, raw in self.documents:
            self._document(number, raw, models)
        if not self.lines and not models:
            self.lines.append("no ModelServing document: a spec needs one per model")
        if self.lines:
            raise ConfigError("\n".join(self.lines), problems=tuple(self.lines))
        try:
            config = ServeConfig.model_validate({**self.data, "models": models}, context=context)
        except ValidationError as exc:
            lines = [_SNAKE_RE.sub(_spelled, line) for line in _problems(exc, place=self._place)]
            # In the order of the documents (pydantic's is that of the config's fields).
            self.lines.extend(line for _, line in sorted(zip(self.numbers, lines, strict=True), key=lambda p: p[0]))
            raise ConfigError("\n".join(self.lines), problems=tuple(self.lines)) from None
        return config, self.resources

    def _document(self, number: int, raw: Any, models: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            what = "a list" if isinstance(raw, list) else f"{type(raw).__name__} {raw!r}"[:80]
            self.problem(_Entry(number, None), (), f"expected a mapping of apiVersion, kind, metadata and spec, not {what}")
            return
        metadata = raw.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        entry = _Entry(number, name if isinstance(name, str) else None)
        kind = raw.get("kind")
        cls = _KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            if raw.get("apiVersion") != API_VERSION:
                self.problem(entry, ("apiVersion",), f"expected {API_VERSION!r}, not {raw.get('apiVersion')!r}")
            message = "Field required" if kind is None else f"unknown kind {kind!r}"
            self.problem(entry, ("kind",), f"{message}: expected 'ModelServing' or 'ServeConfig'")
            return
        try:
            doc = cls.model_validate(raw)
        except ValidationError as exc:

            def place(loc: Loc) -> tuple[str, Loc, list[str] | None]:
                return entry.prefix, loc, _known_at(cls, loc[:-1])

            self.lines.extend(_problems(exc, place=place))
            return
        if isinstance(doc, _ServeSettings):
            self._settings(entry, doc)
        else:
            self._model(entry, doc, models)

    def _settings(self, entry: _Entry, doc: _ServeSettings) -> None:
        if self.settings is not None:
            self.problem(entry, ("kind",), f"a second ServeConfig document (the first is document"
                         f" {self.settings.number}): give every daemon-wide setting in one")
            return
        self.settings = entry
        unknown = _unknown_keys(doc.spec, _SETTINGS_KEYS, ("spec",))
        for loc, message in unknown:
            self.problem(entry, loc, message)
        self.data = {_SETTINGS_KEYS[key]: value for key, value in doc.spec.items() if key in _SETTINGS_KEYS}

    def _model(self, entry: _Entry, doc: _ModelServing, models: dict[str, Any]) -> None:
        name = doc.metadata.name
        if name in self.models:
            self.problem(entry, ("metadata", "name"),
                         f"model {name!r} is already defined by document {self.models[name].number}")
            return
        self.models[name] = entry
        spec = doc.spec
        entry.role = spec.roles.name
        unknown = _unknown_keys(spec.model, _MODEL_KEYS, ("spec", "model"))
        for loc, message in unknown:
            self.problem(entry, loc, message)
        model = {_MODEL_KEYS[key]: value for key, value in spec.model.items() if key in _MODEL_KEYS}
        if spec.roles.server is not None:
            model["replicas"] = spec.roles.server.replicas
        elif spec.roles.sharded is not None:
            sharded = spec.roles.sharded
            model["replicas"] = sharded.replicas
            if sharded.workerReplicas is not None:
                model["local_workers"] = sharded.workerReplicas
            else:
                model["workers"] = sharded.workers
        for field, key in _SPEC_FIELDS.items():
            value = getattr(spec, key)
            if value is not None:
                model[field] = value
        for field in _RESOURCE_FIELDS:
            if field in spec.resources.model_fields_set:
                model[field] = getattr(spec.resources, field)
        models[name] = model
        self.resources[name] = spec.resources

    def _place(self, loc: Loc) -> tuple[str, Loc, list[str] | None]:
        """Where a problem of the ServeConfig built from the documents is written in them."""
        if len(loc) >= 2 and loc[0] == "models" and str(loc[1]) in self.models:
            entry = self.models[str(loc[1])]
            self.numbers.append(entry.number)
            if len(loc) == 2:  # the name itself
                return entry.prefix, ("metadata", "name"), None
            return entry.prefix, entry.model_path(str(loc[2])) + loc[3:], None
        if self.settings is None:
            self.numbers.append(0)
            return "", loc, None
        self.numbers.append(self.settings.number)
        if loc:
            return self.settings.prefix, ("spec", to_camel(str(loc[0])), *loc[1:]), None
        return self.settings.prefix, ("spec",), None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error rather than the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found the key {key_node.value!r} twice", key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_documents(text: str, name: str, path: str | os.PathLike[str] | None) -> list[tuple[int, Any]]:
    try:
        return [(number, doc) for number, doc in enumerate(yaml.load_all(text, Loader=_UniqueKeyLoader), 1)
                if doc is not None]  # fmt: skip
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = exc.problem or exc.context or "cannot parse"
        raise ConfigError(f"{where}: invalid YAML: {problem}", path=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}", path=path) from None


def _toml_documents(data: dict[str, Any], name: str, path: str | os.PathLike[str] | None) -> list[tuple[int, Any]]:
    documents = data.get("documents")
    problems = [f"{name}: unknown key {key!r}: a spec in TOML holds only [[documents]]" for key in data if key != "documents"]
    if not isinstance(documents, list):
        problems.append(f"{name}: documents: expected an array of tables, [[documents]]")
    if problems:
        raise ConfigError("\n".join(problems), path=path, problems=tuple(problems))
    assert isinstance(documents, list)
    return list(enumerate(documents, 1))


def _is_text(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and "\n" in source


def _read(
    source: str | os.PathLike[str], *, format: Literal["yaml", "toml"] | None, context: dict[str, Any]
) -> tuple[ServeConfig, dict[str, Resources]]:
    """Read a spec file or text; relative paths against the context's ``base_dir``, else the file's folder
    (the current one for a text)."""
    if _is_text(source):
        assert isinstance(source, str)
        return _read_documents(source, yaml_text=format != "toml", path=None, context=context)
    if format is None:
        format = "toml" if Path(source).suffix.lower() == ".toml" else "yaml"
    context = {"base_dir": Path(os.path.abspath(source)).parent, **context}
    return _read_documents(_read_text(source), yaml_text=format == "yaml", path=source, context=context)


def _read_documents(
    data: str | dict[str, Any], *, yaml_text: bool, path: str | os.PathLike[str] | None, context: dict[str, Any]
) -> tuple[ServeConfig, dict[str, Resources]]:
    name = os.fspath(path) if path is not None else "<spec>"
    if isinstance(data, dict):
        documents = _toml_documents(data, name, path)
    elif yaml_text:
        documents = _yaml_documents(data, name, path)
    else:
        try:
            parsed = tomllib.loads(data)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name}: invalid TOML: {exc}", path=path) from None
        documents = _toml_documents(parsed, name, path)
    try:
        return _Reader(documents).read(context)
    except ConfigError as exc:
        if path is None:
            raise
        problems = tuple(f"{name}: {line}" for line in exc.problems)
        raise ConfigError("\n".join(problems), path=path, problems=problems) from None


def load_spec_data(data: str | dict[str, Any], *, path: str | os.PathLike[str], yaml: bool) -> ServeConfig:
    """The daemon's reading of the spec file at ``path`` whose text (YAML) or parsed TOML is ``data``."""
    config, _ = _read_documents(data, yaml_text=yaml, path=path, context=daemon_context(path))
    return config


def load_spec(source: str | os.PathLike[str], *, format: Literal["yaml", "toml"] | None = None) -> ServeConfig:
    """Read, validate and return the serve config of a spec, as ``llamaproc serve`` does.

    ``source`` is a file (TOML when it ends in ``.toml``, else YAML), or the
    spec's text itself when it is a ``str`` with a line break (YAML unless
    ``format="toml"``). Relative paths are taken against the file's folder
    (the current one for a text), and the model files must exist. Raises
    :class:`ConfigError` with one line per problem: ``FILE: document N (NAME):
    key.path: problem``; ``replicas`` above 1 of a sharded model are refused (the
    daemon runs one).
    """
    config, _ = _read(source, format=format, context=daemon_context(None))
    return config


def read_spec(
    source: str | os.PathLike[str],
    *,
    format: Literal["yaml", "toml"] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> ServingSpec:
    """Read and validate a spec for another runner than the daemon (``llamaproc render``).

    As :func:`load_spec`, but the model files need not exist here, relative
    paths are taken against ``model_dir`` when given (where the models are
    where the spec runs), and ``replicas`` may be above 1.
    """
    context: dict[str, Any] = {"check_paths": False, "one_replica": False}
    if model_dir is not None:
        context["base_dir"] = Path(model_dir)
    config, resources = _read(source, format=format, context=context)
    return ServingSpec(config=config, resources=resources)


# --- writing -------------------------------------------------------------------------------------


def _plain(value: Any, default: Any) -> Any:
    """A config value as a spec writes it: plain YAML/TOML types that read back to the same value."""
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "never"  # a duration that is off where the default is on
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 30 seconds, a weight of 1: every float field takes an int
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v, None) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, None) for k, v in value.items()}
    return value


def _changed(model: BaseModel, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``model`` that differ from their defaults (and the required ones), camelCase, plain."""
    out: dict[str, Any] = {}
    for field, info in type(model).model_fields.items():
        if field in skip:
            continue
        value = getattr(model, field)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if info.is_required() or value != default:
            out[to_camel(field)] = _plain(value, default)
    return out


def config_to_spec(config: ServeConfig) -> list[dict[str, Any]]:
    """``config`` as spec documents (dicts of plain values) that :func:`load_spec` reads back equal.

    A ``ServeConfig`` document first when a daemon-wide setting differs from
    its default (the API keys included, in clear: treat the result as a
    secret when there are any), then one ``ModelServing`` document per model.
    Durations are seconds, sizes bytes, paths as they are in ``config``.
    """
    documents: list[dict[str, Any]] = []
    settings = _changed(config, skip=("models",))
    if settings:
        documents.append({"apiVersion": API_VERSION, "kind": "ServeConfig", "spec": settings})
    for name, model in config.models.items():
        spec: dict[str, Any] = {"model": _changed(model, skip=(*_ROLE_FIELDS, *_SPEC_FIELDS, *_RESOURCE_FIELDS))}
        resources = {field: getattr(model, field) for field in _RESOURCE_FIELDS
                     if getattr(model, field) != ModelConfig.model_fields[field].get_default()}  # fmt: skip
        if resources:
            spec["resources"] = resources
        if model.local_workers is not None:
            role: dict[str, Any] = {"replicas": model.replicas, "workerReplicas": model.local_workers}
            spec["roles"] = {"sharded": role}
        elif model.workers is not None:
            role = {"replicas": model.replicas, "workers": _plain(model.workers, None)}
            spec["roles"] = {"sharded": role}
        else:
            spec["roles"] = {"server": {"replicas": model.replicas}}
        for field, key in _SPEC_FIELDS.items():
            value = getattr(model, field)
            if value != ModelConfig.model_fields[field].get_default():
                spec[key] = _plain(value, None)
        documents.append({"apiVersion": API_VERSION, "kind": "ModelServing", "metadata": {"name": name}, "spec": spec})
    return documents

