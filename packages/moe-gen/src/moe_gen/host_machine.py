"""The host a run ran on, as the run record names it: its CPU model, its memory and its GPU.

moe-cap prices the host from its hardware table, whose CPU names drop the vendor's marks
("EPYC 9654", "Xeon Platinum 8480+"); `cpu_table_name` turns the kernel's model string
("AMD EPYC 9654 96-Core Processor", "Intel(R) Xeon(R) Platinum 8480+") into that form. A model the
table does not know is still recorded as it is (moe-cap then asks for `--cpu`).
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

__all__ = ["cpu_model", "cpu_table_name", "gpu_name", "host_memory_bytes"]

_MARKS = re.compile(r"\((?:R|TM|r|tm)\)|\bCPU\b|@\s*[\d.]+\s*GHz|\b\d+-Core\b|\bProcessor\b"
                    r"|^\s*(?:AMD|Intel)\b")


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The kernel's CPU model string (`/proc/cpuinfo`'s first `model name`, else the platform's
    processor name), or None where neither says."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or None


def cpu_table_name(model: str) -> str:
    """`model` without vendor marks, clock and core count: the hardware table's form."""
    return " ".join(_MARKS.sub(" ", model).split())


def host_memory_bytes(meminfo: str | None = None) -> int | None:
    """The host's memory (`/proc/meminfo`'s `MemTotal`), or None where it is not readable."""
    if meminfo is None:
        path = Path("/proc/meminfo")
        meminfo = path.read_text(errors="replace") if path.is_file() else ""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def gpu_name(device: str) -> str:
    """The GPU as moe-cap's hardware table names it ("NVIDIA H200" -> "H200"); "none" for a run
    on the CPU alone (docs/moe-cap.md)."""
    if device != "cuda":
        return "none"
    return torch.cuda.get_device_name().removeprefix("NVIDIA ").strip()
