"""Kubernetes manifests for a serving spec (``llamaproc render``).

Each model becomes the objects that run it in a cluster, every pod a
``llamaproc serve`` of that one model (so that a crash or a hang of
llama-server is handled in the pod, by the daemon's supervisor, and the API
keys, the queue and the metrics are the daemon's):

* a ConfigMap ``NAME-config`` with the pod's spec (``serving.yaml``): the
  spec's daemon-wide settings (without API keys) and the model alone, one
  replica, its path under the model volume;
* llama-server alone (``roles.server``, or ``roles.sharded`` with listed or
  registered ``workers`` outside the cluster): a Deployment of ``replicas``
  pods and a Service ``NAME`` in front of them;
* llama-server over rpc workers (``roles.sharded`` with ``workerReplicas``): a
  LeaderWorkerSet (kubernetes-sigs/lws) of ``replicas`` groups of
  ``workerReplicas + 1`` pods. The leader runs the daemon with
  ``workers = "registered"``; each worker runs ``llamaproc worker``, which
  registers with its group's leader at ``$(LWS_LEADER_ADDRESS)`` (the address
  LWS gives every pod of a group) under its own DNS name in the group's
  headless service. A Service ``NAME`` selects the leaders, and NetworkPolicies
  let only a group's leader reach its workers' rpc port (rpc-server has no
  authentication): one denies every connection to the workers, one per group
  allows its leader.

Every daemon takes its API key from the Secret named by ``api_keys_secret``
(key ``api-key``, as ``LLAMAPROC_API_KEYS``; the workers send it as
``LLAMAPROC_API_KEY`` when they register): a spec with ``apiKeys`` is refused
rather than written into a ConfigMap. Relative model paths are taken against
the model volume, mounted read-only at :data:`MODEL_DIR`: a PersistentVolumeClaim
(``models_claim``) or a directory of the node (``models_host_path``).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import yaml

from ..errors import ConfigError
from ..runtime import ModelConfig, Resources, ServeConfig, ServingSpec, config_to_spec, read_spec, redacted

__all__ = ["MODEL_DIR", "dump_manifests", "render_manifests"]

#: Where the model volume is mounted in the pods; relative model paths of a spec are taken against it.
MODEL_DIR = "/models"
#: Where the pod's spec is mounted.
CONFIG_DIR = "/etc/llamaproc"
CONFIG_FILE = "serving.yaml"
#: The daemon's state directory (pid file, socket) in the pods.
STATE_DIR = "/run/llamaproc"
HTTP_PORT = 8484
RPC_PORT = 50052
#: The key of the API keys' Secret that holds the key.
SECRET_KEY = "api-key"
#: A label value, a Service name: lower-case letters, digits and '-', starting with a letter.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: Room left in a name for what LWS and Deployments add to it (``-GROUP-WORKER``, ``-HASH-SUFFIX``).
_MAX_NAME = 40
#: The labels LWS puts on the pods of a group.
_LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"


def render_manifests(
    spec: ServingSpec,
    *,
    image: str,
    namespace: str | None = None,
    models_claim: str | None = None,
    models_host_path: str | None = None,
    api_keys_secret: str = "llamaproc-api-keys",
    gpu_resource: str = "nvidia.com/gpu",
) -> list[dict[str, Any]]:
    """The Kubernetes objects that run every model of ``spec`` (read with ``model_dir=MODEL_DIR``), in order.

    ``image`` holds llamaproc with its daemon extra and llama-server (and
    rpc-server for sharded models). The model volume is the claim
    ``models_claim``, or the node's directory ``models_host_path``, or by
    default the claim ``llamaproc-models``. ``gpu_resource`` is the extended
    resource one pod asks for when its model's device is not ``"cpu"``.
    Raises :class:`~llamaproc.errors.ConfigError` for a spec with API keys
    or a ledger URL with a password (both would be written into a ConfigMap),
    a model name that makes no Kubernetes name, and both volumes at once.
    A model's ``env`` goes into the ConfigMap too: keep secrets out of it.
    """
    if models_claim is not None and models_host_path is not None:
        raise ConfigError("give the model volume as a claim or as a host path, not both")
    config = spec.config
    if config.api_keys:
        raise ConfigError(
            "the spec has apiKeys, which would be written into a ConfigMap: keep them out of the spec and put"
            f" the key in the Secret {api_keys_secret!r} (key {SECRET_KEY!r}) that the pods read"
        )
    if config.ledger is not None and redacted(config.ledger) != config.ledger:
        raise ConfigError(
            "the spec's ledger URL has a password, which would be written into a ConfigMap: give the daemons a"
            " Redis they reach without one (e.g. behind a NetworkPolicy)"
        )
    if models_host_path is not None:
        volume: dict[str, Any] = {"name": "models", "hostPath": {"path": models_host_path, "type": "Directory"}}
    else:
        claim = models_claim if models_claim is not None else "llamaproc-models"
        volume = {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    context = _Context(image=image, namespace=namespace, volume=volume, secret=api_keys_secret, gpu=gpu_resource)
    names: dict[str, str] = {}
    manifests: list[dict[str, Any]] = []
    for name, model in config.models.items():
        kube_name = _kube_name(name)
        if kube_name in names:
            raise ConfigError(f"models {names[kube_name]!r} and {name!r} make the same Kubernetes name {kube_name!r}")
        names[kube_name] = name
        manifests.extend(_Model(context, config, name, kube_name, model, spec.resources[name]).objects())
    return manifests


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people and kubectl: no anchors for repeated parts, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_manifests(manifests: list[dict[str, Any]]) -> str:
    """``manifests`` as one multi-document YAML text, in order (``kubectl apply -f -`` reads it)."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)


def _kube_name(name: str) -> str:
    """The model's name as a Kubernetes object name (and label value): ``Qwen2.5:7b`` → ``qwen2-5-7b``."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if text and not text[0].isalpha():
        text = f"model-{text}"
    if not _NAME_RE.fullmatch(text) or len(text) > _MAX_NAME:
        raise ConfigError(
            f"model {name!r} makes no Kubernetes name: give it a name of at most {_MAX_NAME} letters, digits"
            " and dashes"
        )
    return text


def _quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity: ``2Gi`` when exact, else the number."""
    for unit, suffix in ((2**40, "Ti"), (2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki")):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


class _Context:
    def __init__(self, *, image: str, namespace: str | None, volume: dict[str, Any], secret: str, gpu: str) -> None:
        self.image = image
        self.namespace = namespace
        self.volume = volume
        self.secret = secret
        self.gpu = gpu


class _Model:
    """The objects of one model."""

    def __init__(
        self, context: _Context, config: ServeConfig, name: str, kube_name: str, model: ModelConfig,
        resources: Resources,
    ) -> None:  # fmt: skip
        self.context = context
        self.config = config
        self.name = name
        self.kube = kube_name
        self.model = model
        self.resources = resources
        #: llama-server over rpc workers that this model's own pods run.
        self.grouped = model.local_workers is not None
        self.labels = {"app.kubernetes.io/name": "llamaproc", "app.kubernetes.io/instance": kube_name}

    def objects(self) -> list[dict[str, Any]]:
        text = self.pod_spec_text()
        checksum = hashlib.sha256(text.encode()).hexdigest()[:16]
        objects = [self.object("v1", "ConfigMap", f"{self.kube}-config", data={CONFIG_FILE: text})]
        if self.grouped:
            objects.append(self.leader_worker_set(checksum))
            objects.append(self.service("leader"))
            objects.extend(self.network_policies())
        else:
            objects.append(self.deployment(checksum))
            objects.append(self.service("server"))
        return objects

    # -- pieces -------------------------------------------------------------------------------------

    def object(self, api_version: str, kind: str, name: str, **body: Any) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name}
        if self.context.namespace is not None:
            metadata["namespace"] = self.context.namespace
        metadata["labels"] = dict(self.labels)
        metadata["annotations"] = {"llamaproc/model": self.name}
        return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}

    def selector(self, component: str) -> dict[str, str]:
        return {**self.labels, "app.kubernetes.io/component": component}

    def pod_spec_text(self) -> str:
        """The spec one pod's daemon reads: this model alone, one replica, over registered workers in a group."""
        update: dict[str, Any] = {"replicas": 1}
        if self.grouped:
            update |= {"local_workers": None, "workers": "registered"}
        model = self.model.model_copy(update=update)
        config = self.config.model_copy(
            update={"models": {self.name: model}, "preload": tuple(p for p in self.config.preload if p == self.name)}
        )
        text = yaml.safe_dump_all(config_to_spec(config), sort_keys=False)
        read_spec(text)  # what the pod will read must read: a mistake here is a bug, not the user's
        return text

    def resource_limits(self) -> dict[str, Any]:
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.resources.memory is not None:
            requests["memory"] = limits["memory"] = _quantity(self.resources.memory)
        if self.resources.device != "cpu":
            limits[self.context.gpu] = "1"
        out: dict[str, Any] = {}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
        return out

    def secret_env(self, variable: str) -> dict[str, Any]:
        return {"name": variable, "valueFrom": {"secretKeyRef": {"name": self.context.secret, "key": SECRET_KEY}}}

    def daemon_pod(self) -> dict[str, Any]:
        probe = {"httpGet": {"path": "/health", "port": "http"}}
        container: dict[str, Any] = {
            "name": "llamaproc",
            "image": self.context.image,
            "command": [
                "llamaproc", "serve", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
                "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--state-dir", STATE_DIR,
            ],
            "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
            "env": [self.secret_env("LLAMAPROC_API_KEYS")],
            "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {**probe, "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 6},
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                {"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
                {"name": "state", "mountPath": STATE_DIR},
            ],
        }  # fmt: skip
        limits = self.resource_limits()
        if limits:
            container["resources"] = limits
        # On SIGTERM the daemon lets requests finish for drain_timeout, then stops llama-server with its grace.
        grace = self.model.restart_grace_period if self.model.restart_grace_period is not None else 5.0
        return {
            "terminationGracePeriodSeconds": math.ceil(self.config.drain_timeout + grace) + 5,
            "containers": [container],
            "volumes": [
                {"name": "config", "configMap": {"name": f"{self.kube}-config"}},
                self.context.volume,
                {"name": "state", "emptyDir": {}},
            ],
        }

    def worker_pod(self) -> dict[str, Any]:
        command = [
            "llamaproc", "worker", "--host", "0.0.0.0", "--port", str(RPC_PORT),
            "--register", f"http://$(LWS_LEADER_ADDRESS):{HTTP_PORT}",
            # The worker's name in its group's headless service (named after the set), as LWS names its pods.
            "--advertise", f"$(POD_NAME).{self.kube}.$(POD_NAMESPACE):{RPC_PORT}",
        ]  # fmt: skip
        if self.model.threads is not None:
            command += ["--threads", str(self.model.threads)]
        container: dict[str, Any] = {
            "name": "rpc-worker",
            "image": self.context.image,
            "command": command,
            "ports": [{"name": "rpc", "containerPort": RPC_PORT, "protocol": "TCP"}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                self.secret_env("LLAMAPROC_API_KEY"),
            ],
        }
        limits = self.resource_limits()
        if limits:
            container["resources"] = limits
        return {"containers": [container]}

    # -- objects ------------------------------------------------------------------------------------

    def deployment(self, checksum: str) -> dict[str, Any]:
        selector = self.selector("server")
        template = {
            "metadata": {"labels": selector, "annotations": {"llamaproc/config-checksum": checksum}},
            "spec": self.daemon_pod(),
        }
        spec = {"replicas": self.model.replicas, "selector": {"matchLabels": selector}, "template": template}
        return self.object("apps/v1", "Deployment", self.kube, spec=spec)

    def leader_worker_set(self, checksum: str) -> dict[str, Any]:
        assert self.model.local_workers is not None
        template = {
            "size": self.model.local_workers + 1,
            # A lost worker takes its group down and up again, so that the leader starts over all of them.
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {
                "metadata": {"labels": self.selector("leader"), "annotations": {"llamaproc/config-checksum": checksum}},
                "spec": self.daemon_pod(),
            },
            "workerTemplate": {"metadata": {"labels": self.selector("worker")}, "spec": self.worker_pod()},
        }
        # The workers start with the leader (not once it is ready), so that they register as soon as it listens.
        spec = {"replicas": self.model.replicas, "startupPolicy": "LeaderCreated", "leaderWorkerTemplate": template}
        return self.object("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", self.kube, spec=spec)

    def service(self, component: str) -> dict[str, Any]:
        port = {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
        return self.object("v1", "Service", self.kube, spec={"selector": self.selector(component), "ports": [port]})

    def network_policies(self) -> list[dict[str, Any]]:
        """No connection to a worker but from its own group's leader, on the rpc port.

        Policies add up: the first selects every worker of the set and allows
        nothing; each group's own then allows its leader. A group beyond the
        rendered replicas has only the first until rendered again.
        """
        workers = self.selector("worker")
        deny = {"podSelector": {"matchLabels": workers}, "policyTypes": ["Ingress"], "ingress": []}
        policies = [self.object("networking.k8s.io/v1", "NetworkPolicy", f"{self.kube}-workers", spec=deny)]
        for group in range(self.model.replicas):
            index = {_LWS_GROUP: str(group)}
            allow = {
                "podSelector": {"matchLabels": {**workers, **index}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {**self.selector("leader"), **index}}}],
                    "ports": [{"protocol": "TCP", "port": RPC_PORT}],
                }],
            }  # fmt: skip
            name = f"{self.kube}-group-{group}-rpc"
            policies.append(self.object("networking.k8s.io/v1", "NetworkPolicy", name, spec=allow))
        return policies
