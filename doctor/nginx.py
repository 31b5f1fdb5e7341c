"""A deliberately buffering nginx, the way many web UI set-ups ship it: proxy buffering on, gzip on for events.

It stands in for the proxy in front of a chat UI when the seed table is built. Everything it writes stays in one
folder; it needs no root (when started as root it still keeps its files there, and buffers in memory only).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")

_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream backend {{
        server {upstream};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # the buffering a stream must not meet: held in memory until a buffer is full or the answer ends
            proxy_buffering on;
            proxy_max_temp_file_size 0;
            # and compression of the event stream, as a generic "gzip everything text" set-up does
            gzip on;
            gzip_proxied any;
            gzip_min_length 0;
            gzip_types text/event-stream application/x-ndjson;
        }}
    }}
}}
"""


class NginxUnavailable(Exception):
    """nginx is not installed; ``make seed-table`` installs Debian's."""


def nginx_binary() -> str:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise NginxUnavailable("nginx is not installed (Debian: apt-get install nginx-light)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def buffering_conf(root: Path, upstream: str, port: int) -> str:
    """``upstream`` is HOST:PORT."""
    return _CONF.format(root=root, upstream=upstream, port=port)


@dataclass
class BufferingNginx:
    """nginx in front of ``upstream`` (HOST:PORT) on a free 127.0.0.1 port, as a child process."""

    root: Path
    upstream: str
    port: int = 0
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 20.0) -> None:
        binary = nginx_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.root / "nginx.conf"
        conf.write_text(buffering_conf(self.root.resolve(), self.upstream, self.port))
        root = str(self.root.resolve())
        # -e: the error log before the configuration is read, which by default is a file only root may open
        self._process = subprocess.Popen([binary, "-p", root, "-e", f"{root}/error.log", "-c", str(conf.resolve())])
        deadline = time.monotonic() + ready_timeout_s
        while True:  # nginx has no readiness signal to wait on but its listening socket
            if self._process.poll() is not None:
                log = (self.root / "error.log").read_text() if (self.root / "error.log").exists() else ""
                raise RuntimeError(f"nginx exited with {self._process.returncode}: {log[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not listen on {self.port} within {ready_timeout_s} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
