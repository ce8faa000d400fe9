"""The environment a run was measured in: versions, device, driver, NVML, git, date, command."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "numpy", "pandas", "matplotlib", "nvidia-ml-py", "torchdeq")


def resolve_device(requested: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a concrete device string; ValueError if absent."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        index = requested.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"bad device {requested!r}; use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r} does not exist: {torch.cuda.device_count()} "
                             "CUDA device(s) present")
        return requested
    raise ValueError(f"unknown device {requested!r}; valid: auto, cpu, cuda, cuda:N")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def device_kind(device: str) -> str:
    """A directory-safe name for the kind of device, used for reference runs and baselines:
    'cpu', or the GPU's name ('NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3')."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_status(library: Any = None) -> dict[str, Any]:
    """NVML availability, with the error text when there is no driver (never a crash)."""
    from bench.measure.nvml import load_nvml

    lib, why = load_nvml(library)
    if lib is None:
        return {"available": False, "reason": why}
    try:
        driver = lib.nvmlSystemGetDriverVersion()
        return {"available": True, "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                "devices": lib.nvmlDeviceGetCount()}
    except Exception as err:  # a broken driver install: report, don't crash
        return {"available": False, "reason": f"NVML query failed: {err}"}
    finally:
        with contextlib.suppress(Exception):
            lib.nvmlShutdown()


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    cwd = cwd or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    return {"sha": sha, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def capture(device: str = "cpu", argv: list[str] | None = None, nvml_library: Any = None) -> dict[str, Any]:
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "version": torch.version.cuda}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        cuda.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version())
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        "device": device,
        "device_name": device_name(device),
        "device_kind": device_kind(device),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "nvml": nvml_status(nvml_library),
        "versions": versions(),
        "git": git_state(),
    }
