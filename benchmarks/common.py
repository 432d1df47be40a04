"""Helpers shared by the benchmark scripts: the machine, process-tree memory, files.

Nothing here imports Flower or Ray, so the harness that launches and watches the runs stays
light. Memory is read from ``/proc`` (Linux), no psutil needed.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ machine


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, OS and library versions: the header of every report."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for name in ("flwr", "ray", "torch", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed
            versions[name] = "-"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "load (1/5/15 min)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def machine_markdown() -> str:
    return "\n".join(f"- {k}: {v}" for k, v in machine().items())


# ------------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's gcs_server, raylet, agents and workers)."""
    kids = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, []))
    return tree


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) ``pid`` has used so far, from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (14, 15)


@dataclass
class TreeMemory:
    """Samples the summed RSS (and PSS) of a process tree in a background thread.

    RSS summed over processes counts shared pages (the torch library, Ray's shared-memory
    object store) once per process that maps them, so it over-states the machine's real
    use; PSS splits shared pages between their users and sums to the real total. Both
    peaks are kept.
    """

    root: int
    also_group: int | None = None  # a process group to count too (a Ray cluster's)
    interval: float = 0.2
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    # CPU seconds of every process seen, as last sampled (a load-independent figure: on a
    # shared machine wall times swing with the others' load, CPU time much less).
    cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = process_tree(self.root)
        if self.also_group is not None:
            pids = sorted(set(pids) | set(process_group(self.also_group)))
        self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
        self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
        self.peak_processes = max(self.peak_processes, len(pids))
        for p in pids:
            self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_seconds(p))

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss: int
    peak_pss: int
    peak_processes: int
    launched_at: float  # time.time() just before the child was started
    # CPU seconds of the whole tree, sampled every 0.2 s: each process's last 0.2 s before
    # it exits are not seen (the root's own are, from the kernel's account of the child).
    cpu_s: float = 0.0


def run_child(
    argv: Sequence[str], *, log: Path, timeout: float, also_group: int | None = None
) -> ChildRun:
    """Run ``argv`` in its own process group, watching the whole tree's memory.

    Whatever the child leaves behind in its process group (a Ray process that outlived
    ``ray.shutdown``) is killed afterwards, so one run cannot slow down the next.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with TreeMemory(proc.pid, also_group) as mem:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                out.write(f"\n[harness] timed out after {timeout:g} s\n")
                code = -1
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    root = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    mem.cpu[proc.pid] = max(mem.cpu.get(proc.pid, 0.0), root)
    _kill_group(proc.pid)
    return ChildRun(code, wall, mem.peak_rss, mem.peak_pss, mem.peak_processes, launched, mem.cpu_s)


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


# --------------------------------------------------------------------------------- files


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def python() -> str:
    return sys.executable


# ---------------------------------------------------------------------------- Ray cluster


def start_ray_cluster(num_cpus: int | None = None) -> tuple[str, int, Path]:
    """``ray start --head`` on a free port in its own process group.

    Returns (address, process group, temp dir). Stop it with :func:`stop_ray_cluster`, which
    kills exactly that process group: ``ray stop`` would stop every Ray on the machine.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    temp_dir = Path(f"/tmp/pollinate-bench-ray-{os.getpid()}-{port}")  # socket paths: short
    argv = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--port",
        str(port),
        "--temp-dir",
        str(temp_dir),
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    if num_cpus:
        argv += ["--num-cpus", str(num_cpus)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        _kill_group(proc.pid)
        raise RuntimeError(f"ray start failed: {out[-2000:]}")
    return f"127.0.0.1:{port}", proc.pid, temp_dir


def stop_ray_cluster(pgid: int, temp_dir: Path) -> None:
    _kill_group(pgid)
    subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
