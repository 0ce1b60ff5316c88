"""Versions and hardware, for quantisation cards and benchmark tables."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    import torch

    return {"mpq": package_version("mpq-compiler"), "torch": torch.__version__,
            "transformers": package_version("transformers"), "optuna": package_version("optuna"),
            "python": platform.python_version()}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    # The vector ISA torch's CPU kernels run with (AVX2, AVX512, ...): two "AMD EPYC" machines
    # with different ones differ 5x in bf16 matmul speed.
    isa = torch.backends.cpu.get_cpu_capability()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs ({threads} torch threads, {isa}){gpu}"
