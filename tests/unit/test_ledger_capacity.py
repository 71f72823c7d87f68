"""Detecting device memory: parsers on recorded outputs, and the live detection of this machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from llamaproc.ledger import detect_capacity
from llamaproc.ledger._capacity import parse_nvidia_smi, read_amd_vram

# `nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits` on a two-GPU host (MiB a line).
NVIDIA_SMI_TWO_GPUS = "24564\n81559\n"


def test_nvidia_smi_output_is_read_in_mib() -> None:
    assert parse_nvidia_smi(NVIDIA_SMI_TWO_GPUS) == [24564 * 2**20, 81559 * 2**20]


def test_nvidia_smi_lines_that_are_not_sizes_are_skipped() -> None:
    assert parse_nvidia_smi("[N/A]\nWARNING: infoROM is corrupted at gpu 0000:01:00.0\n8192\n") == [8192 * 2**20]
    assert parse_nvidia_smi("") == []


def test_amd_vram_is_read_from_sysfs_in_card_order(tmp_path: Path) -> None:
    for card, vram in [("card1", "17163091968"), ("card0", "8573157376")]:
        (tmp_path / card / "device").mkdir(parents=True)
        (tmp_path / card / "device" / "mem_info_vram_total").write_text(vram + "\n")
    (tmp_path / "card0-DP-1" / "device").mkdir(parents=True)  # a connector, not a card
    (tmp_path / "card0-DP-1" / "device" / "mem_info_vram_total").write_text("1\n")
    (tmp_path / "card2" / "device").mkdir(parents=True)  # a card of another driver: no such file
    assert read_amd_vram(tmp_path) == [8573157376, 17163091968]
    assert read_amd_vram(tmp_path / "missing") == []


def test_this_machine_has_its_ram_as_cpu() -> None:
    capacity = detect_capacity()
    assert capacity["cpu"] == psutil.virtual_memory().total
    assert set(capacity) - {"cpu"} == {f"gpu{i}" for i in range(len(capacity) - 1)}


@pytest.mark.gpu
def test_this_machine_s_gpus_are_detected() -> None:
    amd = read_amd_vram(Path("/sys/class/drm"))
    if shutil.which("nvidia-smi") is None and not amd:
        pytest.skip("no GPU here: no nvidia-smi and no amdgpu card with mem_info_vram_total in /sys/class/drm")
    capacity = detect_capacity()
    assert capacity.get("gpu0", 0) > 0
