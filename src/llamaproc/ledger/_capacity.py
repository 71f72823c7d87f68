"""Detecting a host's device memory: RAM for ``cpu``, and each GPU's memory as ``gpu0``, ``gpu1`` ...

NVIDIA GPUs are read through NVML (the ``pynvml`` module of nvidia-ml-py,
when it is installed), else through ``nvidia-smi``; AMD GPUs through the
amdgpu driver's sysfs files (``mem_info_vram_total``). NVIDIA GPUs are
numbered first, then AMD ones. A machine without a GPU has ``cpu`` only.
Each probe that fails (no driver, no tool, an answer we cannot read) counts
as no GPU of that kind: detection never fails because of a GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

__all__ = ["detect_capacity", "parse_nvidia_smi", "read_amd_vram"]

_NVIDIA_SMI_TIMEOUT = 10.0


def detect_capacity() -> dict[str, int]:
    """This host's memory per device, in bytes: ``{"cpu": RAM, "gpu0": VRAM, ...}``."""
    capacity = {"cpu": int(psutil.virtual_memory().total)}
    gpus = _nvidia_nvml()
    if gpus is None:
        gpus = _nvidia_smi()
    gpus = [*gpus, *read_amd_vram(Path("/sys/class/drm"))]
    for index, memory in enumerate(gpus):
        capacity[f"gpu{index}"] = memory
    return capacity


def parse_nvidia_smi(text: str) -> list[int]:
    """Bytes per GPU from ``nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`` (MiB a line).

    Lines that are not a number (``[N/A]``, warnings) are skipped.
    """
    sizes = []
    for line in text.splitlines():
        line = line.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", line):
            sizes.append(int(float(line) * 2**20))
    return sizes


def read_amd_vram(drm: Path) -> list[int]:
    """Bytes per AMD GPU from ``<drm>/card<N>/device/mem_info_vram_total``, in card order."""
    found: list[tuple[int, int]] = []
    try:
        cards = list(drm.iterdir())
    except OSError:
        return []
    for card in cards:
        match = re.fullmatch(r"card(\d+)", card.name)
        if match is None:
            continue  # connectors (card0-DP-1) and render nodes
        try:
            text = (card / "device" / "mem_info_vram_total").read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            found.append((int(match.group(1)), int(text)))
    return [memory for _, memory in sorted(found)]


def _nvidia_nvml() -> list[int] | None:
    """Bytes per NVIDIA GPU through NVML; ``None`` when pynvml is not installed or NVML does not start."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    nvml: Any = pynvml
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any NVML failure (no driver, no GPU) means: ask nvidia-smi
        return None
    try:
        count = int(nvml.nvmlDeviceGetCount())
        return [int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total) for i in range(count)]
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _nvidia_smi() -> list[int]:
    """Bytes per NVIDIA GPU through ``nvidia-smi``; empty when it is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []
