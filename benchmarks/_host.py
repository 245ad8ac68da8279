"""What a speed figure was measured on: the CPU, its ISA level and how the fused kernels were built.

A figure holds for its host only: the fused kernels once met their targets on an AVX-512 host and
ran 3-12x slower on an AVX2 one. Every speed table of benchmarks/ is printed under these lines.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("model name", "Model", "CPU part"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_march() -> str:
    """What ``gcc -march=native`` means here (``-mcpu`` on Arm), as gcc reports it."""
    for flag in ("-march", "-mcpu"):
        try:
            out = subprocess.run(["gcc", f"{flag}=native", "-Q", "--help=target"], capture_output=True,
                                 text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return "? (no gcc)"
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == f"{flag}=":
                return parts[1]
    return "?"


def describe() -> list[str]:
    """Lines naming the host, for the head of a benchmark's output."""
    from longmem.kernels import cpu

    lines = [
        f"host: {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs, "
        f"gcc -march=native means {native_march()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}",
    ]
    try:
        build = cpu.build_description()
        lines.append(f"fused CPU kernels: {build['version']} ({build['compiler']}), {build['flags']}")
    except cpu.BuildError as err:
        lines.append(f"fused CPU kernels: not built ({str(err).splitlines()[0]})")
    return lines
