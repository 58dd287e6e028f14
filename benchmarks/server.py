"""nginx (Debian's package) on 127.0.0.1 serving a folder, started and stopped by a benchmark.

    with Nginx(root) as srv:
        srv.url("/img/000001.jpg")

The generated config uses sendfile, keep-alive (up to 100k requests per connection), no
access log and two worker processes, so the server is never the bottleneck of a benchmark
(it serves from the page cache; its CPU use is reported with each result). Extra
``locations`` add response headers for a path prefix (e.g. the Hub's ``X-Repo-Commit``), so the
same server can imitate a Hugging Face endpoint for files.

Run it by hand to look at a corpus: ``python benchmarks/server.py FOLDER`` (Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.path.exists(p)), None)
    if not found:
        sys.exit("nginx not found: apt-get install -y nginx (Debian's package)")
    return found


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, root: Path, workers: int = 2, locations: dict[str, dict[str, str]] | None = None) -> None:
        self.root = Path(root).resolve()
        self.workers = workers
        self.locations = locations or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-", dir=str(Path(__file__).resolve().parent / "_work")))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + "/" + path.lstrip("/")

    def _config(self) -> str:
        d = self.dir
        user = "user root;" if os.geteuid() == 0 else ""
        extra = ""
        for prefix, headers in self.locations.items():
            adds = "".join(f'            add_header {k} "{v}" always;\n' for k, v in headers.items())
            extra += f"        location {prefix} {{\n{adds}        }}\n"
        return f"""
{user}
worker_processes {self.workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    open_file_cache max=20000 inactive=120s;
    client_body_temp_path {d}/client;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{
        image/jpeg jpg jpeg; image/png png; image/webp webp; application/x-tar tar;
        application/gzip gz tgz; text/plain txt; application/json json; application/octet-stream parquet;
    }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location / {{ }}
{extra}    }}
}}
"""

    def start(self) -> "Nginx":
        for attempt in range(5):
            self.port = free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen(
                [nginx_binary(), "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start; see {self.dir / 'error.log'}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.base + "/__ready__", timeout=1)
            except urllib.error.HTTPError:
                return True  # 404: it answers
            except OSError:
                time.sleep(0.05)
                continue
            return True
        return False

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = [self.proc.pid]
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = open(f"/proc/{entry.name}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(entry.name))
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        tck = os.sysconf("SC_CLK_TCK")
        for pid in self.pids():
            try:
                f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += (int(f[11]) + int(f[12])) / tck
            except OSError:
                pass
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful; the master takes its workers along
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        # A benchmark stopped with SIGTERM (timeout, kill) must still stop its server.
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _raise_interrupt)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with Nginx(Path(sys.argv[1] if len(sys.argv) > 1 else ".")) as srv:
        print(f"serving {srv.root} at {srv.base} (Ctrl-C stops)")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
