"""What a benchmark ran on: CPU, cores, memory, GPU and driver, library versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version

import av


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[dict]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, driver, memory = (p.strip() for p in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return gpus


def describe() -> dict:
    ffmpeg = None
    if shutil.which("ffmpeg"):
        try:
            ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True,
                                    timeout=10).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("segsynth", "numpy", "onnxruntime", "onnxruntime-gpu", "av", "torch", "tensorrt", "cuda-python")
                     if _version(name)},
        "pyav_ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
        "ffmpeg_cli": ffmpeg,
    }


def one_line(machine: dict) -> str:
    gpu = ", ".join(g["name"] for g in machine["gpus"]) or "no GPU"
    return f"{machine['cpu']} ({machine['cores']} cores, {machine['memory_gib']} GiB), {gpu}"
