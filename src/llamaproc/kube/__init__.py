"""Kubernetes manifests for a serving spec: what ``llamaproc render`` prints."""

from ._render import MODEL_DIR, dump_manifests, render_manifests

__all__ = ["MODEL_DIR", "dump_manifests", "render_manifests"]
