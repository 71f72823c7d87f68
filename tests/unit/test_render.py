"""`llamaproc render`: the Kubernetes objects of a serving spec, validated offline against their schemas.

Built-in kinds are checked with kubernetes-validate (the Kubernetes JSON schemas it ships, strict: no
unknown field). A LeaderWorkerSet is checked in two ways: its pod templates as PodTemplates with
kubernetes-validate, and its own fields against the schema of its CustomResourceDefinition when a copy
of the CRD is at hand (see tests/data/README.md), else against the part of that schema written out below.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llamaproc import ConfigError
from llamaproc.cli import main
from llamaproc.kube import MODEL_DIR, dump_manifests, render_manifests
from llamaproc.runtime import read_spec

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted(ROOT.glob("examples/serving.*"))
KUBERNETES = "1.33"
CRD_NAME = "leaderworkerset.x-k8s.io_leaderworkersets.yaml"

SPEC = """\
apiVersion: llamaproc/v1
kind: ServeConfig
spec: {drainTimeout: 20s, preload: [chat, "Big.Model:70b"]}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: chat}
spec:
  model: {path: models/chat.gguf, parallel: 4}
  restartGracePeriodSeconds: 10
  roles: {server: {replicas: 3}}
  resources: {memory: 2GiB, device: gpu}
---
apiVersion: llamaproc/v1
kind: ModelServing
metadata: {name: "Big.Model:70b"}
spec:
  model: {path: /data/big.gguf, threads: 8, split: [1, 2]}
  roles: {sharded: {replicas: 2, workerReplicas: 2}}
  resources: {memory: 1536MiB}
"""


def find_crd() -> Path | None:
    """The LeaderWorkerSet CRD: $LLAMAPROC_LWS_CRD, tests/data/, or a shared/ folder beside the repository."""
    places = [os.environ.get("LLAMAPROC_LWS_CRD"), ROOT / "tests" / "data" / CRD_NAME]
    places += [folder / "shared" / "lws" / CRD_NAME for folder in (ROOT.parent, ROOT.parent.parent)]
    return next((Path(p) for p in places if p and Path(p).is_file()), None)


def strict(schema: Any) -> Any:
    """The CRD's schema, but an unknown field is an error (the API server drops it, or refuses it with
    kubectl's strict field validation) rather than passing unseen."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):  # fmt: skip
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


#: The LeaderWorkerSet's own fields that render writes, as its CRD (lws v0.10.0) defines them.
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0, "maximum": 1000000},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {
                            "enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]
                        },
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def lws_schema() -> Any:
    crd_path = find_crd()
    if crd_path is None:
        return LWS_SCHEMA
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


def validate(manifest: dict[str, Any], lws_schema: Any) -> None:
    """Raise unless ``manifest`` is valid for Kubernetes (and LWS): offline, strict."""
    if manifest["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
        return
    jsonschema.Draft4Validator(lws_schema).validate(manifest)
    template = manifest["spec"]["leaderWorkerTemplate"]
    for part in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template[part]}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def render(text: str, **options: Any) -> list[dict[str, Any]]:
    return render_manifests(read_spec(text, model_dir=MODEL_DIR), **{"image": "example/llamaproc:1", **options})


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


# --- every example renders, every object validates -----------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_to_valid_objects(path: Path, lws_schema: Any) -> None:
    manifests = render_manifests(read_spec(path, model_dir=MODEL_DIR), image="example/llamaproc:1", namespace="llm")
    assert manifests
    for manifest in manifests:
        validate(manifest, lws_schema)
        assert manifest["metadata"]["namespace"] == "llm"
    assert yaml.safe_load_all(dump_manifests(manifests)) and list(yaml.safe_load_all(dump_manifests(manifests))) == (
        manifests
    )


def test_the_test_spec_renders_to_valid_objects(lws_schema: Any) -> None:
    manifests = render(SPEC, models_host_path="/srv/models")
    assert [m["kind"] for m in manifests] == [
        "ConfigMap", "Deployment", "Service",
        "ConfigMap", "LeaderWorkerSet", "Service", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
    ]  # fmt: skip
    for manifest in manifests:
        validate(manifest, lws_schema)


def test_validation_can_fail(lws_schema: Any) -> None:
    """The checks above see a misspelled field and a wrong type, in built-in kinds and in the LeaderWorkerSet."""
    manifests = render(SPEC)
    deployment = by_kind(manifests, "Deployment")[0]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, lws_schema)
    lws = by_kind(manifests, "LeaderWorkerSet")[0]
    broken = {**lws, "spec": {**lws["spec"], "startupPolicy": "Whenever"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, lws_schema)
    template = lws["spec"]["leaderWorkerTemplate"]
    template["workerTemplate"]["spec"]["containers"][0]["port"] = 1
    with pytest.raises(jsonschema.ValidationError):  # kubernetes-validate's errors are jsonschema's too
        validate(lws, lws_schema)


def test_validation_is_offline(monkeypatch: pytest.MonkeyPatch, lws_schema: Any) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no network in these tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for manifest in render(SPEC):
        validate(manifest, lws_schema)


@pytest.mark.skipif(find_crd() is None, reason=f"no copy of {CRD_NAME} here (see tests/data/README.md)")
def test_the_leader_worker_set_validates_against_its_crd(lws_schema: Any) -> None:
    assert lws_schema is not LWS_SCHEMA
    for manifest in by_kind(render(SPEC), "LeaderWorkerSet"):
        validate(manifest, lws_schema)


# --- what the objects say ------------------------------------------------------------------------


def test_a_server_role_is_a_deployment_and_a_service() -> None:
    config_map, deployment, service = render(SPEC)[:3]
    labels = {"app.kubernetes.io/name": "llamaproc", "app.kubernetes.io/instance": "chat"}
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "chat"
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "llamaproc", "serve", "--config", "/etc/llamaproc/serving.yaml", "--host", "0.0.0.0", "--port", "8484",
        "--state-dir", "/run/llamaproc",
    ]  # fmt: skip
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"] == {
        "requests": {"memory": "2Gi"},
        "limits": {"memory": "2Gi", "nvidia.com/gpu": "1"},
    }
    # The key comes from the Secret, by reference.
    assert container["env"] == [
        {"name": "LLAMAPROC_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "llamaproc-api-keys", "key": "api-key"}}}
    ]
    assert pod["terminationGracePeriodSeconds"] == 20 + 10 + 5  # drain, then llama-server's grace, and a margin
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "llamaproc-models", "readOnly": True}} in (
        pod["volumes"]
    )
    assert service["spec"]["selector"] == {**labels, "app.kubernetes.io/component": "server"}
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]
    assert config_map["metadata"]["name"] == "chat-config"


def test_the_pod_config_is_the_model_alone_with_one_replica() -> None:
    manifests = render(SPEC)
    chat, big = (m["data"]["serving.yaml"] for m in by_kind(manifests, "ConfigMap"))
    chat_config = read_spec(chat).config
    assert list(chat_config.models) == ["chat"] and chat_config.preload == ("chat",)
    model = chat_config.models["chat"]
    assert (str(model.path), model.replicas, model.parallel, model.restart_grace_period) == (
        "/models/models/chat.gguf", 1, 4, 10.0,
    )  # fmt: skip
    assert chat_config.drain_timeout == 20.0
    big_config = read_spec(big).config
    big_model = big_config.models["Big.Model:70b"]
    assert (str(big_model.path), big_model.replicas, big_model.workers, big_model.local_workers) == (
        "/data/big.gguf", 1, "registered", None,
    )  # fmt: skip
    assert big_model.split == (1.0, 2.0) and big_config.preload == ("Big.Model:70b",)


def test_a_sharded_role_is_a_leader_worker_set() -> None:
    manifests = render(SPEC, namespace="llm")
    (lws,) = by_kind(manifests, "LeaderWorkerSet")
    assert lws["metadata"]["name"] == "big-model-70b"
    assert lws["metadata"]["annotations"] == {"llamaproc/model": "Big.Model:70b"}
    spec = lws["spec"]
    assert spec["replicas"] == 2
    template = spec["leaderWorkerTemplate"]
    assert template["size"] == 3  # the leader and 2 workers
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    assert leader["command"][:2] == ["llamaproc", "serve"]
    assert leader["livenessProbe"]["httpGet"]["path"] == "/health"
    assert leader["resources"] == {"requests": {"memory": "1536Mi"}, "limits": {"memory": "1536Mi"}}
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert worker["command"] == [
        "llamaproc", "worker", "--host", "0.0.0.0", "--port", "50052",
        "--register", "http://$(LWS_LEADER_ADDRESS):8484",
        "--advertise", "$(POD_NAME).big-model-70b.$(POD_NAMESPACE):50052", "--threads", "8",
    ]  # fmt: skip
    env = {e["name"]: e["valueFrom"] for e in worker["env"]}
    assert env["LLAMAPROC_API_KEY"] == {"secretKeyRef": {"name": "llamaproc-api-keys", "key": "api-key"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "volumes" not in template["workerTemplate"]["spec"]  # the leader reads the model, not the workers
    (service,) = [s for s in by_kind(manifests, "Service") if s["metadata"]["name"] == "big-model-70b"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "leader"


def test_only_a_groups_leader_reaches_its_workers() -> None:
    deny, *groups = by_kind(render(SPEC), "NetworkPolicy")
    workers = {
        "app.kubernetes.io/name": "llamaproc", "app.kubernetes.io/instance": "big-model-70b",
        "app.kubernetes.io/component": "worker",
    }  # fmt: skip
    assert deny["spec"] == {"podSelector": {"matchLabels": workers}, "policyTypes": ["Ingress"], "ingress": []}
    assert len(groups) == 2  # one per replica (group)
    for index, policy in enumerate(groups):
        group = {"leaderworkerset.sigs.k8s.io/group-index": str(index)}
        assert policy["spec"]["podSelector"] == {"matchLabels": {**workers, **group}}
        (rule,) = policy["spec"]["ingress"]
        leader = {**workers, "app.kubernetes.io/component": "leader", **group}
        assert rule == {"from": [{"podSelector": {"matchLabels": leader}}], "ports": [{"protocol": "TCP", "port": 50052}]}


def test_listed_workers_stay_outside_the_cluster() -> None:
    text = SPEC.replace("{sharded: {replicas: 2, workerReplicas: 2}}", "{sharded: {workers: ['10.0.0.2:50052']}}")
    text = text.replace("split: [1, 2]", "split: [1]")
    manifests = render(text)
    assert not by_kind(manifests, "LeaderWorkerSet") and not by_kind(manifests, "NetworkPolicy")
    assert [d["metadata"]["name"] for d in by_kind(manifests, "Deployment")] == ["chat", "big-model-70b"]
    config = read_spec(by_kind(manifests, "ConfigMap")[1]["data"]["serving.yaml"]).config
    assert config.models["Big.Model:70b"].workers == ("10.0.0.2:50052",)


def test_volume_and_secret_options() -> None:
    manifests = render(SPEC, models_claim="weights", api_keys_secret="keys")
    pod = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["volumes"][1] == {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    assert pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "keys"
    pod = by_kind(render(SPEC, models_host_path="/srv/m"), "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["volumes"][1] == {"name": "models", "hostPath": {"path": "/srv/m", "type": "Directory"}}
    with pytest.raises(ConfigError, match="not both"):
        render(SPEC, models_claim="a", models_host_path="/b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SPEC.replace("{drainTimeout: 20s,", "{apiKeys: [k1], drainTimeout: 20s,"),
         "the spec has apiKeys, which would be written into a ConfigMap"),
        (SPEC.replace("{drainTimeout: 20s,", "{ledger: 'redis://:pw@db:6379/0', drainTimeout: 20s,"),
         "the spec's ledger URL has a password, which would be written into a ConfigMap"),
        (SPEC.replace("Big.Model:70b", "chat."), "models 'chat' and 'chat.' make the same Kubernetes name 'chat'"),
        (SPEC.replace("Big.Model:70b", "b" * 41), "makes no Kubernetes name"),
    ],
)
def test_specs_that_do_not_render(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render(text.replace("preload: [chat, \"Big.Model:70b\"]", "preload: []"))


def test_a_name_that_starts_with_a_digit() -> None:
    manifests = render(SPEC.replace("Big.Model:70b", "70b"))
    assert by_kind(manifests, "LeaderWorkerSet")[0]["metadata"]["name"] == "model-70b"


# --- the command ------------------------------------------------------------------------------------


def test_the_render_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], lws_schema: Any) -> None:
    spec = tmp_path / "serving.yaml"
    spec.write_text(SPEC)
    assert main(["render", str(spec), "--image", "example/llamaproc:1", "--namespace", "ai"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# llamaproc render serving.yaml: 9 objects\n")
    manifests = list(yaml.safe_load_all(out))
    assert manifests == render(SPEC, namespace="ai")
    for manifest in manifests:
        validate(manifest, lws_schema)


def test_the_render_command_reports_a_bad_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "serving.yaml"
    spec.write_text(SPEC.replace("parallel: 4", "parallel: 0"))
    assert main(["render", str(spec), "--image", "i"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"llamaproc render: {spec}: document 2 (chat): spec.model.parallel: Input should be greater than or equal"
        " to 1\n"
    )
