"""Serving specs (YAML and TOML documents): reading, writing back, and the errors that name where."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic.alias_generators import to_camel

from llamaproc import ConfigError
from llamaproc.runtime import (
    ModelConfig,
    Resources,
    ServeConfig,
    config_to_spec,
    load_config,
    load_spec,
    read_spec,
)

EXAMPLES = Path(__file__).parents[2] / "examples"

FULL = """\
apiVersion: llamaproc/v1
kind: ServeConfig
metadata: {name: daemon}
spec:
  maxLoadedModels: 2
  memoryBudget: 8GiB
  idleTimeout: 5m
  queueSize: 4
  drainTimeout: 10s
  restartBackoff: 1s
  restartBackoffMax: 1m
  maxRestarts: 3
  restartWindow: 1h30m
  stallTimeout: never
  writeTimeout: 20s
  preload: [chat]
  apiKeys: [key-one, key-two]
  allowedHosts: [LLM.Example.com, "::1"]
  allowedOrigins: ["https://app.example.com"]
  headerTimeout: 5s
  bodyTimeout: 1m
  maxConnections: 64
  maxReshards: 5
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: chat}
spec:
  model:
    path: models/chat.gguf
    ctxSize: 4096
    parallel: 4
    gpuLayers: 99
    threads: 2
    embeddings: true
    args: [--flash-attn, "on"]
    env: {FOO: bar}
    binary: bin/llama-server
    stallTimeout: 10s
  recoveryPolicy: None
  restartGracePeriodSeconds: 30
  roles:
    server: {replicas: 1}
  resources: {memory: 2GiB, device: gpu0, priority: high}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: big}
spec:
  model: {path: models/big.gguf, split: [3, 1], minWorkers: 1, maxReshards: 0, stallTimeout: never}
  roles:
    sharded: {replicas: 1, workerReplicas: 2}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: "qwen2.5:7b"}
spec:
  model: {path: /abs/qwen.gguf, split: capacity}
  roles:
    sharded: {workers: ["10.0.0.2:50052", "[::1]:50053"]}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: reg}
spec:
  model: {path: models/chat.gguf}
  roles:
    sharded: {workers: registered}
"""


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the model files FULL names (the /abs one is read without the file check)."""
    (tmp_path / "models").mkdir()
    for name in ("chat", "big"):
        (tmp_path / "models" / f"{name}.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder: Path, text: str, name: str = "serving.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems(text: str, *, format: Any = None) -> list[str]:
    """The problem lines of a spec text read the daemon's way (no file: no file prefix)."""
    with pytest.raises(ConfigError) as info:
        load_spec(text, format=format)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def model_doc(model: str = "{path: tiny.gguf}", extra: str = "", name: str = "tiny") -> str:
    return f"apiVersion: llamaproc/v1\nkind: ModelServing\nmetadata: {{name: {name}}}\nspec:\n  model: {model}\n{extra}"


# --- reading ---------------------------------------------------------------------------------------


def test_full_spec(models: Path) -> None:
    spec = read_spec(write(models, FULL))
    cfg = spec.config
    assert (cfg.max_loaded_models, cfg.memory_budget, cfg.idle_timeout, cfg.queue_size) == (2, 8 * 2**30, 300.0, 4)
    assert (cfg.restart_backoff, cfg.restart_backoff_max, cfg.max_restarts, cfg.restart_window) == (1, 60, 3, 5400)
    assert (cfg.stall_timeout, cfg.write_timeout, cfg.preload, cfg.max_reshards) == (None, 20.0, ("chat",), 5)
    assert [k.get_secret_value() for k in cfg.api_keys] == ["key-one", "key-two"]
    assert cfg.allowed_hosts == ("llm.example.com", "[::1]")
    assert list(cfg.models) == ["chat", "big", "qwen2.5:7b", "reg"]
    assert cfg.models["chat"] == ModelConfig(
        path=models / "models" / "chat.gguf", ctx_size=4096, parallel=4, gpu_layers=99, threads=2, embeddings=True,
        args=("--flash-attn", "on"), env={"FOO": "bar"}, binary=str(models / "bin" / "llama-server"),
        stall_timeout=10.0, recovery_policy="None", restart_grace_period=30.0, device="gpu0", priority="high",
    )  # fmt: skip
    big = cfg.models["big"]
    assert (big.local_workers, big.workers, big.split, big.min_workers, big.max_reshards) == (2, None, (3.0, 1.0), 1, 0)
    assert big.stall_timeout == float("inf") and big.recovery_policy == "Restart" and big.replicas == 1
    assert cfg.models["qwen2.5:7b"].workers == ("10.0.0.2:50052", "[::1]:50053")
    assert cfg.models["reg"].workers == "registered"
    assert spec.resources == {
        "chat": Resources(memory=2 * 2**30, device="gpu0", priority="high"),
        "big": Resources(),
        "qwen2.5:7b": Resources(),
        "reg": Resources(),
    }


def test_the_daemon_reads_a_yaml_spec_as_its_config(models: Path) -> None:
    (models / "abs").mkdir()
    text = FULL.replace("/abs/qwen.gguf", str(models / "models" / "big.gguf"))
    for name in ("serving.yaml", "serving.yml"):
        path = write(models, text, name)
        assert load_config(path) == load_spec(path) == read_spec(path).config


def test_round_trip(models: Path) -> None:
    """YAML → ServeConfig → documents → ServeConfig is the same config, and the documents again the same."""
    config = read_spec(write(models, FULL)).config
    documents = config_to_spec(config)
    assert [d["kind"] for d in documents] == ["ServeConfig"] + ["ModelServing"] * 4
    again = read_spec(yaml.safe_dump_all(documents)).config
    assert again == config
    assert config_to_spec(again) == documents


def test_round_trip_of_defaults(models: Path) -> None:
    config = load_spec(model_doc("{path: models/chat.gguf}"))
    documents = config_to_spec(config)
    assert documents == [{
        "apiVersion": "llamaproc/v1", "kind": "ModelServing", "metadata": {"name": "tiny"},
        "spec": {"model": {"path": str(models / "models" / "chat.gguf")}, "roles": {"server": {"replicas": 1}}},
    }]  # fmt: skip
    assert load_spec(yaml.safe_dump_all(documents)) == config


def test_round_trip_of_every_toml_config(models: Path) -> None:
    """A TOML config (today's format) and its spec documents are the same config."""
    toml = """
max_loaded_models = 3
idle_timeout = "never"
stall_timeout = 0
api_keys = ["k"]
[models.a]
path = "models/chat.gguf"
replicas = 1
recovery_policy = "None"
restart_grace_period = "2s"
[models.b]
path = "models/big.gguf"
workers = "registered"
split = [1, 2]
min_workers = 0
"""
    config = load_config(write(models, toml, "serve.toml"))
    assert config.models["a"].recovery_policy == "None" and config.models["a"].restart_grace_period == 2.0
    documents = config_to_spec(config)
    assert documents[0]["spec"] == {"maxLoadedModels": 3, "stallTimeout": "never", "apiKeys": ["k"]}
    assert documents[2]["spec"]["roles"] == {"sharded": {"replicas": 1, "workers": "registered"}}
    assert load_spec(yaml.safe_dump_all(documents)) == config


def test_toml_spec_is_the_same_as_yaml(models: Path) -> None:
    toml = """
[[documents]]
apiVersion = "llamaproc/v1"
kind = "ServeConfig"
spec = { maxLoadedModels = 2, idleTimeout = "5m" }

[[documents]]
apiVersion = "llamaproc/v1"
kind = "ModelServing"
metadata = { name = "chat" }
[documents.spec]
model = { path = "models/chat.gguf", ctxSize = 4096 }
roles = { sharded = { workerReplicas = 2 } }
recoveryPolicy = "None"
"""
    yaml_text = """
apiVersion: llamaproc/v1
kind: ServeConfig
spec: {maxLoadedModels: 2, idleTimeout: 5m}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: chat}
spec:
  model: {path: models/chat.gguf, ctxSize: 4096}
  roles: {sharded: {workerReplicas: 2}}
  recoveryPolicy: None
"""
    from_toml = load_config(write(models, toml, "serving.toml"))
    assert from_toml == load_spec(yaml_text) == load_spec(toml, format="toml") == load_spec(models / "serving.toml")
    assert from_toml.models["chat"].local_workers == 2


def test_old_toml_config_still_works(models: Path) -> None:
    config = load_config(write(models, '[models.tiny]\npath = "models/chat.gguf"\nparallel = 2\n', "serve.toml"))
    tiny = config.models["tiny"]
    assert (tiny.parallel, tiny.replicas, tiny.recovery_policy, tiny.restart_grace_period) == (2, 1, "Restart", None)
    assert config == load_spec(model_doc("{path: models/chat.gguf, parallel: 2}"))


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("serving.*")))
def test_every_example_spec_reads(name: str) -> None:
    spec = read_spec(EXAMPLES / name, model_dir="/models")
    assert spec.config.models and set(spec.resources) == set(spec.config.models)
    assert all(str(m.path).startswith("/models/") for m in spec.config.models.values())


def test_an_empty_serve_config_document_and_blank_documents(models: Path) -> None:
    text = "---\napiVersion: llamaproc/v1\nkind: ServeConfig\n---\n" + model_doc("{path: models/chat.gguf}") + "---\n"
    assert load_spec(text).max_loaded_models == 1


# --- replicas ---------------------------------------------------------------------------------------


def test_replicas_above_one_of_a_sharded_model_are_refused_by_the_daemon_only(models: Path) -> None:
    text = model_doc("{path: models/chat.gguf}", "  roles: {sharded: {replicas: 3, workerReplicas: 2}}\n")
    lines = problems(text)
    assert lines == [
        "document 1 (tiny): spec.roles.sharded.replicas: a sharded model runs one replica in llamaproc serve"
        " (got 3): its rpc workers serve one llama-server at a time; `llamaproc render` runs more as"
        " LeaderWorkerSet groups"
    ]
    path = write(models, text)
    with pytest.raises(ConfigError, match=r"serving.yaml: document 1 \(tiny\): spec.roles.sharded.replicas: "):
        load_config(path)
    assert read_spec(path).config.models["tiny"].replicas == 3  # for `llamaproc render`
    toml = write(models, '[models.tiny]\npath = "models/chat.gguf"\nlocal_workers = 1\nreplicas = 2\n', "serve.toml")
    with pytest.raises(ConfigError, match=r"serve.toml: models.tiny.replicas: a sharded model runs one replica"):
        load_config(toml)
    # A model that is not sharded runs its replicas in the daemon.
    server = write(models, model_doc("{path: models/chat.gguf}", "  roles: {server: {replicas: 3}}\n"))
    assert load_config(server).models["tiny"].replicas == 3


# --- errors -----------------------------------------------------------------------------------------

GOOD_MODEL = "{path: models/chat.gguf}"


@pytest.mark.parametrize(
    ("model", "extra", "line"),
    [
        ("{path: models/chat.gguf, ctxSize: -1}", "", "spec.model.ctxSize: Input should be greater than or equal to 0"),
        ("{path: models/chat.gguf, ctx_size: 1}", "", "spec.model: unknown key 'ctx_size' (did you mean 'ctxSize'?)"),
        ("{path: models/chat.gguf, paralel: 1}", "", "spec.model: unknown key 'paralel' (did you mean 'parallel'?)"),
        ("{path: models/chat.gguf, args: [-c, 2048]}", "", "spec.model.args[1]: Input should be a valid string"),
        ("{path: models/chat.gguf, embeddings: maybe}", "", "spec.model.embeddings: Input should be a valid boolean"),
        ("{path: models/chat.gguf, stallTimeout: soon}", "",
         "spec.model.stallTimeout: invalid duration 'soon': expected e.g. '300ms', '30s', '5m', '1h30m' or 'never'"),
        ("{path: models/none.gguf}", "", "spec.model.path: model file not found: "),
        ("[a, b]", "", "spec.model: Input should be a valid dictionary"),
        (GOOD_MODEL, "  recoveryPolicy: Sometimes\n", "spec.recoveryPolicy: Input should be 'Restart' or 'None'"),
        (GOOD_MODEL, "  restartGracePeriodSeconds: 0\n",
         "spec.restartGracePeriodSeconds: invalid duration 0: must be greater than zero"),
        (GOOD_MODEL, "  roles: {server: {replicas: 0}}\n",
         "spec.roles.server.replicas: Input should be greater than or equal to 1"),
        (GOOD_MODEL, "  roles: {server: {replica: 1}}\n",
         "spec.roles.server: unknown key 'replica' (did you mean 'replicas'?)"),
        (GOOD_MODEL, "  roles: {sharded: {workerReplicas: -1}}\n",
         "spec.roles.sharded.workerReplicas: Input should be greater than or equal to 0"),
        (GOOD_MODEL, "  roles: {sharded: {workers: ['a:1', b]}}\n",
         "spec.roles.sharded.workers[1]: invalid worker address 'b': expected 'host:port'"),
        (GOOD_MODEL, "  roles: {sharded: {workers: ['a:1'], workerReplicas: 1}}\n",
         "spec.roles.sharded: workerReplicas and workers exclude each other: give one of them"),
        (GOOD_MODEL, "  roles: {sharded: {replicas: 1}}\n",
         "spec.roles.sharded: a sharded role needs workerReplicas (a number) or workers"),
        (GOOD_MODEL, "  roles: {server: {}, sharded: {workerReplicas: 1}}\n",
         "spec.roles: give exactly one role: server (llama-server alone) or sharded (over rpc workers)"),
        (GOOD_MODEL, "  roles: {}\n", "spec.roles: give exactly one role"),
        (GOOD_MODEL, "  roles: {worker: {}}\n", "spec.roles: unknown key 'worker'"),
        (GOOD_MODEL, "  resources: {memory: 2 gigs}\n", "spec.resources.memory: invalid size '2 gigs'"),
        (GOOD_MODEL, "  resources: {device: 'g p u'}\n", "spec.resources.device: invalid device 'g p u'"),
        (GOOD_MODEL, "  resources: {priority: top}\n",
         "spec.resources.priority: Input should be 'urgent', 'high', 'normal', 'low' or 'batch'"),
        (GOOD_MODEL, "  resources: {cpu: 2}\n", "spec.resources: unknown key 'cpu'"),
        (GOOD_MODEL, "  rols: {}\n", "spec: unknown key 'rols' (did you mean 'roles'?)"),
        ("{path: models/chat.gguf, split: uniform}", "",
         "spec.model.split: split is only for a sharded model"),
        ("{path: models/chat.gguf, minWorkers: 3}", "  roles: {sharded: {workerReplicas: 2}}\n",
         "spec.model.minWorkers: minWorkers (3) is more than the 2 workers the model has"),
        ("{path: models/min_workers.gguf}", "", "spec.model.path: model file not found: "),
    ],
)
def test_an_invalid_model_field_is_named_by_its_path(models: Path, model: str, extra: str, line: str) -> None:
    lines = problems(model_doc(model, extra))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"document 1 (tiny): {line}"), lines[0]
    if "min_workers.gguf" in model:  # a key's name in a path is not spelled the spec's way
        assert lines[0].endswith(str(models / "models" / "min_workers.gguf"))


@pytest.mark.parametrize("key", sorted(k for k in map(to_camel, ModelConfig.model_fields)
                                       if k not in ("replicas", "localWorkers", "workers", "recoveryPolicy",
                                                    "restartGracePeriod", "priority", "device",
                                                    "progressDeadline")))  # fmt: skip
def test_every_model_key_has_its_camel_case_path(models: Path, key: str) -> None:
    """Each field under spec.model, given a value no field takes, is reported at its own path."""
    model = {"path": "models/chat.gguf", key: {"x": [1]}}
    lines = problems(model_doc(yaml.safe_dump(model, default_flow_style=True).strip()))
    assert lines and all(line.startswith(f"document 1 (tiny): spec.model.{key}") for line in lines), lines


@pytest.mark.parametrize("key", sorted(to_camel(f) for f in ServeConfig.model_fields if f != "models"))
def test_every_daemon_key_has_its_camel_case_path(models: Path, key: str) -> None:
    text = f"apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {{{key}: {{x: [1]}}}}\n---\n" + model_doc(GOOD_MODEL)
    lines = problems(text)
    assert lines and all(line.startswith(f"document 1: spec.{key}") for line in lines), lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {maxLoadedModel: 2}\n---\n" + model_doc(GOOD_MODEL),
         ["document 1: spec: unknown key 'maxLoadedModel' (did you mean 'maxLoadedModels'?)"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {memoryBudget: 8 gigs, queueSize: -1}\n---\n"
         + model_doc(GOOD_MODEL),
         ["document 1: spec.memoryBudget: invalid size '8 gigs': expected e.g. '8GiB', '512MiB', '1.5GB' or a number"
          " of bytes", "document 1: spec.queueSize: Input should be greater than or equal to 0"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\nmetadata: {name: d}\nspec: {preload: [tinny]}\n---\n"
         + model_doc(GOOD_MODEL), ["document 1 (d): spec.preload: unknown model 'tinny' (did you mean 'tiny'?)"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {restartBackoff: 10s, restartBackoffMax: 2s}\n---\n"
         + model_doc(GOOD_MODEL),
         ["document 1: spec: restartBackoffMax (2s) must not be less than restartBackoff (10s)"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {apiKeys: ['a key']}\n---\n" + model_doc(GOOD_MODEL),
         ["document 1: spec.apiKeys[0]: invalid API key: must be non-empty and contain only visible ASCII characters"
          " (no spaces or commas)"]),
        (model_doc(GOOD_MODEL) + "---\n" + model_doc(GOOD_MODEL),
         ["document 2 (tiny): metadata.name: model 'tiny' is already defined by document 1"]),
        (model_doc(GOOD_MODEL, name="'-bad name'"),
         ["document 1 (-bad name): metadata.name: invalid model name '-bad name': must start with a letter or digit"
          " and contain only letters, digits, '.', '_', ':' or '-'"]),
        ("apiVersion: llamaproc/v1\nkind: ModelServing\nspec: {model: {path: x}}\n",
         ["document 1: metadata: Field required"]),
        ("apiVersion: llamaproc/v2\nkind: ModelServing\nmetadata: {name: a}\nspec: {model: {path: x}}\n",
         ["document 1 (a): apiVersion: Input should be 'llamaproc/v1'"]),
        ("apiVersion: llamaproc/v2\nkind: Model\nmetadata: {name: a}\n",
         ["document 1 (a): apiVersion: expected 'llamaproc/v1', not 'llamaproc/v2'",
          "document 1 (a): kind: unknown kind 'Model': expected 'ModelServing' or 'ServeConfig'"]),
        ("apiVersion: llamaproc/v1\nmetadata: {name: a}\n",
         ["document 1 (a): kind: Field required: expected 'ModelServing' or 'ServeConfig'"]),
        ("apiVersion: llamaproc/v1\nkind: ModelServing\nmetadata: {name: a, labels: {}}\nspec: {model: {path: x}}\n",
         ["document 1 (a): metadata: unknown key 'labels'"]),
        ("- a\n- b\n", ["document 1: expected a mapping of apiVersion, kind, metadata and spec, not a list"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\n", ["no ModelServing document: a spec needs one per model"]),
        ("apiVersion: llamaproc/v1\nkind: ServeConfig\n---\napiVersion: llamaproc/v1\nkind: ServeConfig\n---\n"
         + model_doc(GOOD_MODEL),
         ["document 2: kind: a second ServeConfig document (the first is document 1): give every daemon-wide"
          " setting in one"]),
        ("spec: [\n", ["<spec>:2:1: invalid YAML: expected the node content, but found '<stream end>'"]),
        ("apiVersion: llamaproc/v1\nkind: ModelServing\nkind: ServeConfig\n",
         ["<spec>:3:1: invalid YAML: found the key 'kind' twice"]),
    ],
)
def test_document_errors(models: Path, text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_every_problem_is_reported_at_once_in_document_order(models: Path) -> None:
    text = (
        "apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {queueSize: -1, apiKeys: ['']}\n---\n"
        + model_doc("{path: models/chat.gguf, parallel: 0}", name="a")
        + "---\n"
        + model_doc(GOOD_MODEL, "  roles: {sharded: {workerReplicas: -2}}\n", name="b")
    )
    assert problems(text) == [
        "document 1: spec.queueSize: Input should be greater than or equal to 0",
        "document 1: spec.apiKeys[0]: invalid API key: must be non-empty and contain only visible ASCII characters"
        " (no spaces or commas)",
        "document 2 (a): spec.model.parallel: Input should be greater than or equal to 1",
        "document 3 (b): spec.roles.sharded.workerReplicas: Input should be greater than or equal to 0",
    ]


def test_errors_of_a_file_name_it(models: Path) -> None:
    path = write(models, model_doc("{path: models/chat.gguf, ctxSize: x}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: document 1 (tiny): spec.model.ctxSize: Input should be a valid integer"
    assert info.value.path == path
    with pytest.raises(ConfigError, match=r"serving.yaml:1:5: invalid YAML: mapping values are not allowed here$"):
        load_config(write(models, "a: b: c\n"))
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found$"):
        load_config(models / "nope.yaml")


def test_toml_spec_errors(models: Path) -> None:
    toml = '[[documents]]\napiVersion = "llamaproc/v1"\nkind = "ModelServing"\nmetadata = { name = "a" }\n'
    toml += '[documents.spec]\nmodel = { path = "models/chat.gguf", ctxSize = "big" }\n'
    assert problems(toml, format="toml") == ["document 1 (a): spec.model.ctxSize: Input should be a valid integer"]
    assert problems("documents = 1\nother = 2\n", format="toml") == [
        "<spec>: unknown key 'other': a spec in TOML holds only [[documents]]",
        "<spec>: documents: expected an array of tables, [[documents]]",
    ]
    with pytest.raises(ConfigError, match=r"serve.toml: unknown key 'max_loaded_models': a spec in TOML holds only"):
        load_config(write(models, "max_loaded_models = 1\n[[documents]]\nkind = 'ServeConfig'\n", "serve.toml"))


def test_api_keys_are_not_repeated_in_errors(models: Path) -> None:
    lines = problems("apiVersion: llamaproc/v1\nkind: ServeConfig\nspec: {apiKeys: ['secret key']}\n")
    assert not any("secret" in line for line in lines)


def test_resources_carry_the_lease_device_and_priority(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "apiVersion: llamaproc/v1\nkind: ModelServing\nmetadata: {name: m}\n"
        "spec:\n  model: {path: m.gguf}\n  resources: {memory: 1GiB, device: gpu0, priority: batch}\n"
    )
    config = load_spec(spec)
    assert (config.models["m"].device, config.models["m"].priority) == ("gpu0", "batch")
    (document,) = config_to_spec(config)
    assert document["spec"]["resources"] == {"priority": "batch", "device": "gpu0"}
    assert "priority" not in document["spec"]["model"]
    plain = tmp_path / "p.yaml"
    plain.write_text("apiVersion: llamaproc/v1\nkind: ModelServing\nmetadata: {name: m}\nspec:\n  model: {path: m.gguf}\n")
    assert load_spec(plain).models["m"].priority is None  # the daemon's
