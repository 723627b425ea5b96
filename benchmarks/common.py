"""Helpers shared by the benchmarks: machine facts, matmul peak, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, device: str = "cpu") -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on this machine (the MFU denominator)."""
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(json.dumps(data, indent=2) + "\n")
    m.write_text(markdown)
    return j, m


def _cpu_seconds() -> tuple[float, float]:
    """The machine's busy CPU seconds so far, (at normal priority, at nice > 0), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:8]]  # user nice system idle iowait irq softirq
    hz = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[2] + f[5] + f[6]) / hz, f[1] / hz


def _own_seconds() -> float:
    """CPU seconds of this process and its live children (a server it started), all threads."""
    import psutil

    me, total = psutil.Process(), 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # it ended meanwhile
            pass
    return total


class OtherLoad:
    """How many cores the rest of the machine kept busy over a window (`start` .. `stop`): /proc/stat's busy
    time minus this process tree's own, split into normal priority and nice > 0 (a background job at nice 19
    only takes otherwise idle time). Says whether a timing was taken on a shared machine."""

    def start(self) -> OtherLoad:
        self.t0, self.cpu0, self.own0 = time.monotonic(), _cpu_seconds(), _own_seconds()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        (n1, x1), (n0, x0) = _cpu_seconds(), self.cpu0
        other = max(0.0, (n1 - n0) - (_own_seconds() - self.own0))
        return {"others_cores": round(other / wall, 2), "others_nice_cores": round((x1 - x0) / wall, 2)}
