"""The environment a measurement ran in: versions, device, driver, NVML, git sha, date, command."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.measure.nvml import load_nvml


def describe_environment(device: torch.device | str = "cpu", nvml_library: Any = None) -> dict[str, Any]:
    device = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "device_name": device_name(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env |= {
            "device_total_bytes": props.total_memory,
            "device_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    lib, why = load_nvml(nvml_library)
    env["nvml_available"] = lib is not None
    if lib is None:
        env["nvml_reason"] = why
    else:
        try:
            env["driver"] = _text(lib.nvmlSystemGetDriverVersion())
        except Exception as err:
            env["driver"] = None
            env["nvml_reason"] = f"driver version unreadable ({err})"
    return env


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def device_slug(device: torch.device | str) -> str:
    """A directory name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    name = device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
