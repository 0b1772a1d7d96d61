"""Peak memory of a process and all its descendants, sampled from /proc while it runs (psutil), and the resident
size of Ray's object store when a local Ray runs among them.

RSS counts a shared page in every process that maps it, so the tree's sum over-counts shared memory (Ray's
object store is mapped by the driver that wrote the data and by every worker that reads it): the sum is an upper
bound of what the tree needs, the largest process a lower bound; `private` (RSS minus shared pages: the
anonymous memory, summed) plus the object store is the estimate between them.

The object store is plasma's file in /dev/shm, unlinked once mapped; its tmpfs pages allocated (st_blocks of
the raylet's mapping, through /proc/<raylet>/map_files) are the store's resident size. Ray 2.60's own API for it
(`ray memory`, `ray._private.internal_api.get_memory_info_reply`) needs grpcio, which ray[train] does not
install, and `ray.available_resources()["object_store_memory"]` is the capacity, not what is used.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import psutil


def label(proc: psutil.Process) -> str:
    """What a process is: Ray's title (`ray::RayTrainWorker`), `python -m <module>`, or its name."""
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    if "-m" in cmd[:-1]:
        return f"python -m {cmd[cmd.index('-m') + 1]}"
    return proc.name()


def plasma_bytes(raylet: psutil.Process) -> int | None:
    """Resident bytes of the object store of this raylet (None if it has no plasma mapping we can read)."""
    try:
        with open(f"/proc/{raylet.pid}/maps", encoding="utf-8") as f:
            ranges = [line.split()[0] for line in f if "/plasma" in line]
        files = {}  # one file is often mapped at several addresses: count it once
        for r in ranges:
            st = os.stat(f"/proc/{raylet.pid}/map_files/{r}")
            files[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        return sum(files.values()) or None
    except OSError:
        return None


@dataclass
class ProcessPeak:
    label: str
    rss: int = 0


@dataclass
class TreePeaks:
    """Peaks over the samples: of the tree's sums, of each process, of the object store."""

    rss_sum: int = 0
    private_sum: int = 0
    object_store: int = 0
    processes: dict[int, ProcessPeak] = field(default_factory=dict)
    samples: int = 0
    root: int = 0  # the pid sampled from
    cpu_s: float = 0.0  # filled in by the caller, which can read the tree's CPU time once it has been waited for
    load: float = 0.0  # the machine's load average when the command started (caller's)

    def root_peak(self) -> ProcessPeak:
        return self.processes.get(self.root, ProcessPeak("none"))

    def largest(self) -> ProcessPeak:
        return max(self.processes.values(), key=lambda p: p.rss, default=ProcessPeak("none"))

    def by_label(self, prefix: str) -> list[ProcessPeak]:
        return [p for p in self.processes.values() if p.label.startswith(prefix)]


class TreeSampler:
    """`with TreeSampler(pid) as s:` samples every `interval` s until the block ends; `s.peaks` has the result."""

    def __init__(self, pid: int, interval: float = 0.2):
        try:
            self.root: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self.root = None  # already ended and reaped: nothing to sample
        self.interval = interval
        self.peaks = TreePeaks(root=pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)] if self.root else []
        except psutil.Error:
            return
        rss_sum = private_sum = 0
        for proc in procs:
            try:
                mem = proc.memory_info()
                name = label(proc)
            except psutil.Error:
                continue  # ended between the listing and the read
            rss_sum += mem.rss
            private_sum += mem.rss - mem.shared
            peak = self.peaks.processes.setdefault(proc.pid, ProcessPeak(name))
            if not name.startswith("ray::IDLE"):
                peak.label = name  # Ray retitles a worker when it takes a task: keep its last real title
            peak.rss = max(peak.rss, mem.rss)
            if name == "raylet":
                self.peaks.object_store = max(self.peaks.object_store, plasma_bytes(proc) or 0)
        self.peaks.rss_sum = max(self.peaks.rss_sum, rss_sum)
        self.peaks.private_sum = max(self.peaks.private_sum, private_sum)
        self.peaks.samples += 1


def wait_sampled(proc, interval: float = 0.2) -> tuple[int, TreePeaks]:
    """Wait for a `subprocess.Popen` while sampling its tree; returns (returncode, peaks)."""
    with TreeSampler(proc.pid, interval) as sampler:
        code = proc.wait()
    return code, sampler.peaks
