"""What a benchmark ran on: machine, CPU, versions, date, command. Recorded in every JSON."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
import time
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
    """The common head of every results JSON: kind, machine, versions, date, command, threads,
    and how busy the CPUs were as the run began (with a warning on stderr when others hold them)."""
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.2:
        print(f"pysparse bench: warning: other processes are using {busy:.0%} of the CPUs; "
              f"{torch.get_num_threads()}-thread timings will include waits for a core", file=sys.stderr)
    return {"schema": "pysparse-bench/1", "kind": kind, "machine": machine_info(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["pysparse", *argv]), "argv": list(argv),
            "python_executable": sys.executable, "threads": torch.get_num_threads(),
            "loadavg_start": _loadavg(), "cpu_busy_before": busy}


def cpu_busy_fraction(interval: float = 0.25) -> Optional[float]:
    """Fraction of all CPUs' time that other processes kept busy over ``interval`` seconds
    (Linux /proc/stat less this process's own CPU time), or None. 0.5 on two cores means one
    core is taken, and every two-thread call will wait for it."""
    tick = os.sysconf("SC_CLK_TCK")

    def sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v) - idle) / tick, sum(v) / tick, time.process_time()

    try:
        b0, t0, own0 = sample()
        time.sleep(interval)
        b1, t1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, (b1 - b0) - (own1 - own0)) / max(t1 - t0, 1e-9)


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def busy_note(doc: dict) -> Optional[str]:
    """A note when other processes were running on this machine's cores during the run (the
    1-minute load average, which counts our own run too, above the threads we used)."""
    busy = doc.get("cpu_busy_before") or 0.0
    loads = [v[0] for v in (doc.get("loadavg_start"), doc.get("loadavg_end")) if v]
    top = max(loads, default=0.0)
    # Over 0.2 of the CPUs busy before we started, or a load above what our own threads make.
    if busy > 0.2 or top > doc.get("threads", 1) + 0.5:
        return (f"the machine was busy ({busy:.0%} of {os.cpu_count()} CPUs taken by other processes at the start, "
                f"1-minute load average up to {top:.1f}, {doc.get('threads')} torch threads): timings may "
                "include waits for a core; rerun on a quiet machine before quoting them")
    return None


def finish(doc: dict) -> dict:
    """Record the load average at the end of the run and note a busy machine; returns doc."""
    doc["loadavg_end"] = _loadavg()
    note = busy_note(doc)
    if note:
        doc.setdefault("notes", []).append(note)
    return doc
