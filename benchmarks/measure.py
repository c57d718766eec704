"""Run one command and measure it: wall time, CPU time and peak memory of its process.

CPU time (user + system, all threads, from wait4) is reported beside wall time
because on a shared, overloaded machine the wall time mostly measures the
other tenants; CPU time measures the work done.

Memory is summed over the process and its descendants (our CPU merge runs
one worker process per core).  Peak *anonymous* memory (RssAnon) is what the targets are on: plain RSS also
counts the touched pages of memory-mapped checkpoints, page cache the kernel
can drop, which grows with N even when a merge holds one tensor.  RssAnon is
only visible while the process lives, so /proc/PID/status is sampled every
~50 ms; VmHWM (the kernel's own peak RSS) comes from the last sample and from
wait4's ru_maxrss, which cannot miss a short peak.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Measurement:
    """One run of one command."""

    seconds: float                 # wall time of the process (+ fsync of its output, see run())
    returncode: int
    peak_rss_anon_mb: float        # max RssAnon seen by the sampler
    peak_rss_mb: float             # max VmRSS seen by the sampler
    hwm_mb: float                  # kernel's peak RSS (ru_maxrss / VmHWM)
    cpu_seconds: float = 0.0       # user + system CPU time of the process (all threads): robust to load
    fsync_seconds: float = 0.0     # part of ``seconds`` spent making the output durable afterwards
    samples: int = 0
    output_tail: str = ""
    extra: dict = field(default_factory=dict)


def _descendants(pid: int) -> list[int]:
    """pid and every live descendant (our CPU merge runs worker processes: their memory counts too)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except (OSError, ValueError):
            pass
    return found


def _tree_kb(pid: int) -> dict[str, int]:
    """RssAnon and VmRSS summed over the process tree; VmHWM of the root process."""
    total: dict[str, int] = {}
    for index, member in enumerate(_descendants(pid)):
        status = _status_kb(member)
        for name in ("RssAnon", "VmRSS"):
            total[name] = total.get(name, 0) + status.get(name, 0)
        if index == 0 and "VmHWM" in status:
            total["VmHWM"] = status["VmHWM"]
    return total if total.get("VmRSS") else {}


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("RssAnon", "VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.anon = self.rss = self.hwm = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            s = _tree_kb(self.pid)
            if s:
                self.samples += 1
                self.anon = max(self.anon, s.get("RssAnon", 0))
                self.rss = max(self.rss, s.get("VmRSS", 0))
                self.hwm = max(self.hwm, s.get("VmHWM", 0))
            self.stop.wait(self.interval)


def fsync_path(path: str | None) -> float:
    """fsync a finished output so every tool is timed to a durable file; returns the seconds it took."""
    if not path or not os.path.exists(path):
        return 0.0
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def run(cmd: Sequence[str], env: dict | None = None, output: str | None = None, interval: float = 0.05,
        log_path: str | None = None, cwd: str | None = None) -> Measurement:
    """Run ``cmd``, sampling its memory; the output file (if any) is fsynced inside the timed span.

    stdout/stderr go to ``log_path`` (or are discarded); the last lines come
    back in ``output_tail`` so a failure can be shown.
    """
    log = open(log_path, "w+b") if log_path else open(os.devnull, "w+b")
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        sampler = _Sampler(proc.pid, interval)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:            # interrupted: do not leave the measured process running
            proc.kill()
            os.wait4(proc.pid, 0)
            sampler.stop.set()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        fsync_s = fsync_path(output) if proc.returncode == 0 else 0.0
        seconds = time.perf_counter() - started
        tail = ""
        if log_path:
            log.flush()
            log.seek(max(0, os.path.getsize(log_path) - 4000))
            tail = log.read().decode("utf-8", "replace")
    finally:
        log.close()
    hwm_kb = max(sampler.hwm, usage.ru_maxrss)  # ru_maxrss is in KiB on Linux
    return Measurement(seconds=seconds, returncode=proc.returncode, peak_rss_anon_mb=sampler.anon / 1024,
                       peak_rss_mb=sampler.rss / 1024, hwm_mb=hwm_kb / 1024,
                       cpu_seconds=usage.ru_utime + usage.ru_stime, fsync_seconds=fsync_s,
                       samples=sampler.samples, output_tail=tail)
