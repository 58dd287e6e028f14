"""Shared benchmark machinery: measured subprocess runs, disk sampling, machine load, results.

``measure(cmd)`` runs a command and samples its whole process tree every 50 ms from /proc:
CPU seconds (user + system, the last value seen for every process, including pool workers
that exit before their parent), peak RSS of the tree (sum over live processes at a sample)
and, optionally, the peak size of some folders (the benchmark's extra disk use). It also
records what the rest of the machine did meanwhile (CPU seconds of every other process, from
/proc/stat), so a result says whether somebody else's work disturbed it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
RESULTS = WORK / "results"
PLOTS = HERE / "plots"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MAIN_PY = ROOT / ".venv" / "bin" / "python"


def main_python() -> str:
    return str(MAIN_PY) if MAIN_PY.exists() else sys.executable


def venv_python(name: str) -> Path:
    return WORK / name / "bin" / "python"


# -- machine -----------------------------------------------------------------------------------
def loadavg() -> tuple[float, float, float]:
    a, b, c = open("/proc/loadavg").read().split()[:3]
    return float(a), float(b), float(c)


def _cpu_total() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot."""
    parts = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def machine() -> dict[str, Any]:
    try:
        import PIL

        pil = PIL.__version__
    except ImportError:
        pil = None
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx2": "avx2" in open("/proc/cpuinfo").read(),
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "python": platform.python_version(),
        "pillow_main_venv": pillow_flavour(main_python()),
        "pillow_here": pil,
    }


def pillow_flavour(python: str | Path) -> str:
    """Which Pillow ``python`` really imports. Both distributions may be registered (a venv that
    sees another's site-packages), so the imported PIL's version decides, not the metadata."""
    code = (
        "import importlib.metadata as m, PIL\n"
        "try:\n    simd = m.version('pillow-simd')\n"
        "except m.PackageNotFoundError:\n    simd = None\n"
        "print(('Pillow-SIMD ' if PIL.__version__ == simd else 'Pillow ') + PIL.__version__)\n"
    )
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60).stdout.strip() or "?"
    except Exception:
        return "?"


# -- process-tree sampling ---------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _proc_sample(pid: int) -> tuple[float, int] | None:
    """(cpu seconds, rss bytes) of one process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
        rss = int(fields[21]) * PAGE
        return cpu, rss
    except (OSError, IndexError, ValueError):
        return None


def dir_size(path: Path) -> int:
    total = 0
    stack = [str(path)]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        pass
        except OSError:
            pass
    return total


@dataclass
class Measurement:
    label: str
    cmd: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_disk_mb: float = 0.0
    returncode: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    other_cpu_s: float = 0.0  # CPU seconds used by every other process on the machine meanwhile
    extra: dict[str, Any] = field(default_factory=dict)
    stdout_tail: str = ""
    stderr_tail: str = ""

    def rate(self, n: int) -> float:
        return n / self.wall_s if self.wall_s else 0.0


def measure(
    label: str,
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    disk_paths: list[Path] = (),
    timeout: float = 900,
    interval: float = 0.25,
    disk_interval: float = 0.5,
) -> Measurement:
    """Run ``cmd`` and measure it: wall time, CPU of its whole process tree, peak RSS of the
    tree and peak size of ``disk_paths`` (sampled every ``interval`` / ``disk_interval`` s).

    Wall time and CPU are exact: a thread blocks in ``wait4`` and notes the moment the command
    ends (polling between samples would add up to one interval, ~1 % of a 10 s run, to every
    wall time), and ``wait4``'s CPU counts the command and every descendant it reaped, however
    short-lived. Sampling is only for what has no exact source (RSS of the tree, disk, the top
    process alone), and is kept sparse: at 20 samples a second the sampler itself used ~0.3
    CPU-seconds per 10 s run on 2 cores, a tax the in-memory ceiling never pays. Dirty pages
    of the runs before are written out first (``sync``, not timed), so that no run pays for
    another's writeback."""
    m = Measurement(label, [str(c) for c in cmd])
    os.sync()
    m.load_before = loadavg()
    busy0, _ = _cpu_total()
    t0 = time.perf_counter()
    proc = subprocess.Popen(m.cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [
        threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    ended = threading.Event()
    end: dict[str, Any] = {}

    def wait_loop() -> None:
        # wait4, not proc.wait(): reaping it ourselves is how its rusage is not lost
        _, end["status"], end["usage"] = os.wait4(proc.pid, 0)
        end["t"] = time.perf_counter()
        ended.set()

    waiter = threading.Thread(target=wait_loop, daemon=True)
    waiter.start()
    cpu_seen: dict[int, float] = {}
    peak_rss = 0
    peak_disk = 0

    def disk_loop() -> None:
        nonlocal peak_disk
        while not ended.is_set():
            peak_disk = max(peak_disk, sum(dir_size(p) for p in disk_paths))
            ended.wait(disk_interval)

    disk_thread = threading.Thread(target=disk_loop, daemon=True) if disk_paths else None
    if disk_thread:
        disk_thread.start()
    deadline = t0 + timeout
    try:
        while not ended.is_set():
            rss = 0
            for pid in _tree(proc.pid):
                s = _proc_sample(pid)
                if s is None:
                    continue
                cpu_seen[pid] = max(cpu_seen.get(pid, 0.0), s[0])
                rss += s[1]
            peak_rss = max(peak_rss, rss)
            if time.perf_counter() > deadline:
                m.extra["timeout"] = True
                break
            ended.wait(interval)
    finally:
        if not ended.is_set():  # timed out, or interrupted before the command ended
            os.kill(proc.pid, signal.SIGKILL)  # not proc.kill(): its poll() would reap it under the waiter
        waiter.join()
        proc.returncode = os.waitstatus_to_exitcode(end["status"])
        m.wall_s = end["t"] - t0
        if disk_thread:
            disk_thread.join()
        for r in readers:
            r.join(5)
    busy1, _ = _cpu_total()
    usage = end["usage"]
    m.returncode = proc.returncode
    m.cpu_s = usage.ru_utime + usage.ru_stime  # the command and every descendant it waited for
    m.extra["cpu_main_s"] = round(cpu_seen.get(proc.pid, 0.0), 2)  # the top process alone, as last sampled
    m.peak_rss_mb = peak_rss / 2**20
    m.peak_disk_mb = peak_disk / 2**20
    m.load_after = loadavg()
    m.other_cpu_s = max(0.0, (busy1 - busy0) - m.cpu_s)
    m.stdout_tail = "".join(out_chunks)[-3000:]
    m.stderr_tail = "".join(err_chunks)[-3000:]
    return m


# -- results -----------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def save_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{name}-{stamp}.json"
    payload = {"benchmark": name, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    latest = RESULTS / f"{name}-latest.json"
    latest.write_text(path.read_text())
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def load_str(m: Measurement) -> str:
    return f"{m.load_before[0]:.2f}→{m.load_after[0]:.2f}"


def byte_compile(tree: Path) -> None:
    """Byte-compile ``tree``'s fastfetch package, as pip does for an installed package.

    The benchmarks measure the tool as a user runs it: with PYTHONDONTWRITEBYTECODE set (as
    on this machine) every run would otherwise compile the whole package anew, ~0.1 s of
    start-up in each process that a user pays only once."""
    subprocess.run([main_python(), "-m", "compileall", "-q", str(tree / "fastfetch")], check=True, stdout=subprocess.DEVNULL)


def fetch_help() -> str:
    return subprocess.run([main_python(), str(ROOT / "bin" / "fetch"), "--help"], capture_output=True, text=True, cwd=ROOT).stdout


def run_dir(cmd: list[str]) -> Path:
    """The directory a benchmarked command runs in: a ``bin/fetch`` runs from its own tree, so
    that an older commit's resize workers (``python -m`` without -P, before session 5: the
    current directory first on ``sys.path``) import that commit's modules, not the working
    tree's; anything else runs from the repository."""
    script = Path(cmd[1]) if len(cmd) > 1 else Path()
    return script.parents[1] if script.name == "fetch" and script.parent.name == "bin" else ROOT


def fetch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    # No proxy variables at all (as on this machine): every tool talks to nginx directly.
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        env.pop(k, None)
    env.update(HF_HUB_DISABLE_TELEMETRY="1")
    return env
