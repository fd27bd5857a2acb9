"""What a benchmark ran on: machine, CPU, versions, date, command. Recorded in every JSON."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from importlib import metadata
from typing import Optional, Sequence

import torch

_FALLBACK_L3 = 32 << 20  # when /sys does not say: a typical server L3


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _parse_size(text: str) -> Optional[int]:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def l3_bytes() -> int:
    """Size of the last-level cache this CPU reports (Linux sysfs), or 32 MiB if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for idx in os.listdir(base):
            try:
                with open(f"{base}/{idx}/level") as f:
                    level = int(f.read())
                with open(f"{base}/{idx}/size") as f:
                    size = _parse_size(f.read()) or 0
            except (OSError, ValueError):
                continue
            if level >= 3:
                best = max(best, size)
    except OSError:
        pass
    return best or _FALLBACK_L3


def _version(dist: str) -> Optional[str]:
    # importlib.metadata, not import: importing torchao just to read its version logs warnings.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of python, torch, torchao, triton, numpy and pysparse (None if not installed)."""
    import pysparse

    return {"python": platform.python_version(), "torch": torch.__version__, "torchao": _version("torchao"),
            "triton": _version("triton"), "numpy": _version("numpy"), "pysparse": pysparse.__version__}


def machine_info() -> dict:
    """Platform, CPU model, core count, L3 size, pysparse.cpu_info() and the GPU, if any."""
    import pysparse

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(), "l3_bytes": l3_bytes(), "pysparse_cpu": pysparse.cpu_info(),
            "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_header(kind: str, argv: Sequence[str]) -> dict:
    """The common head of every results JSON: kind, machine, versions, date, command, threads."""
    return {"schema": "pysparse-bench/1", "kind": kind, "machine": machine_info(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["pysparse", *argv]), "argv": list(argv),
            "python_executable": sys.executable, "threads": torch.get_num_threads()}
