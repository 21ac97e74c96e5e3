"""What the benchmarks record about the machine they ran on, and how busy its GPU was."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The cpuinfo flags that decide fp32/bf16 matmul speed on x86."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class GpuUtilisation:
    """nvidia-smi's utilisation.gpu every 0.2 s while running; mean over all samples and over
    the busy span (first to last sample above 0)."""

    def __init__(self, index: int):
        self.index, self.samples, self.proc = index, [], None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    str(self.index),
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def summary(self) -> str:
        if not self.samples:
            return "n/a (no nvidia-smi samples)"
        util = [u for u, _ in self.samples]
        busy = [i for i, u in enumerate(util) if u > 0] or [0]
        span = util[busy[0] : busy[-1] + 1]
        return (
            f"mean {sum(util) / len(util):.0f}% over the run, {sum(span) / len(span):.0f}% over the busy span, "
            f"peak memory {max(m for _, m in self.samples):.0f} MiB"
        )


class NoSampler:
    """Stands for GpuUtilisation where there is no GPU to watch."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
