"""A web server for shards, as `bench data --latency` and the remote-shard tests use it: nginx serving a folder on
a loopback port, and an asyncio proxy in front of it that plays an object store's round trip (a delay per
response) and its faults (503, 429, a reset connection, a short body). Kernel network emulation (netem) is not
everywhere; a proxy is."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # Debian's is outside a user's PATH
CONFIG = """daemon on;
pid {run}/nginx.pid;
error_log {run}/error.log;
worker_processes 1;
{user}
events {{ worker_connections 512; }}
http {{
    access_log {access_log};
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class Nginx:
    """nginx serving `root` at http://127.0.0.1:PORT/ with a config and run folder of its own; with `access_log`,
    every request is a line of `run/access.log` (the tests count them)."""

    def __init__(self, root: Path, run: Path, *, access_log: bool = False):
        self.root, self.run, self.port = root, run, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (run / folder).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # workers read the test's temporary folders
        (run / "nginx.conf").write_text(CONFIG.format(run=run, root=root, port=self.port, user=user,
                                                          access_log=f"{run}/access.log" if access_log else "off"))

    def start(self) -> Nginx:
        subprocess.run([NGINX, "-c", str(self.run / "nginx.conf"), "-p", str(self.run)], check=True,
                       capture_output=True, timeout=30)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        pid_file = self.run / "nginx.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)  # fast shutdown: open connections close at once, as in an outage
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


class Proxy:
    """An HTTP/1.1 proxy in a process of its own (a forked loader worker must not hold its sockets open): each
    request goes to nginx at `upstream_port`; its answer comes back after `delay_s`, or every `period`-th request
    (the last of each `period`) gets the next of `faults` instead: "503", "429", "reset" (the connection is
    closed without an answer) or "short" (the body is cut in half, then the connection closed). With `answers`,
    the server goes down at request number `answers` (0: the first): every connection is closed without an
    answer and new ones are refused. With `part`, a path prefix, `take_down_part()` plays an outage of that part
    only (e.g. one split's folder): from then on, a request for a path under it is closed without an answer."""

    def __init__(self, upstream_port: int, *, delay_s: float = 0.0, faults: tuple[str, ...] = (), period: int = 1,
                 answers: int | None = None, part: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = [str(upstream_port), str(self.port), str(delay_s), ",".join(faults), str(period),
                     str(-1 if answers is None else answers), part]
        self.faults: list[str] = []  # the faults played, once stopped

    def start(self) -> Proxy:
        self.process = subprocess.Popen([sys.executable, "-m", "colorize_dist.bench.serve", *self.args],
                                        stdout=subprocess.PIPE, text=True)
        wait_for_port(self.port)
        return self

    def take_down_part(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        self.process.terminate()
        self.faults = self.process.communicate(timeout=10)[0].split()


async def proxy(upstream_port: int, port: int, delay_s: float, faults: list[str], period: int, answers: int,
                part: str) -> None:
    requests = 0
    clients: set[asyncio.StreamWriter] = set()
    part_down = asyncio.Event()
    down_prefix = b" /" + part.lstrip("/").encode()

    def go_down() -> None:
        server.close()  # refuse new connections
        for open_client in list(clients):
            open_client.transport.abort()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        upstream = None
        clients.add(writer)
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                number, requests = requests, requests + 1
                if number == answers:
                    go_down()
                if 0 <= answers <= number or (part_down.is_set() and down_prefix in request.split(b"\r\n", 1)[0]):
                    return
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", upstream_port)
                upstream[1].write(request)
                head = await upstream[0].readuntil(b"\r\n\r\n")
                body = b"" if request.startswith(b"HEAD") else await upstream[0].readexactly(_content_length(head))
                await asyncio.sleep(delay_s)
                fault = faults[number // period % len(faults)] if faults and number % period == period - 1 else None
                if fault is not None:
                    print(fault, flush=True)
                if fault == "reset":
                    writer.transport.abort()
                    return
                if fault in ("503", "429"):
                    length = b"0" if request.startswith(b"HEAD") else b"5"
                    writer.write(b"HTTP/1.1 %s Busy\r\nContent-Length: %s\r\n\r\n" % (fault.encode(), length)
                                 + (b"" if request.startswith(b"HEAD") else b"busy\n"))
                elif fault == "short":
                    writer.write(head + body[: len(body) // 2])
                    await writer.drain()
                    writer.transport.abort()  # the promised length never arrives
                    return
                else:
                    writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            clients.discard(writer)
            writer.close()
            if upstream is not None:
                upstream[1].close()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, part_down.set)
    server = await asyncio.start_server(client, "127.0.0.1", port)
    async with server:
        await stop.wait()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


if __name__ == "__main__":
    upstream, port, delay, kinds, every, answered, down_part = sys.argv[1:8]
    asyncio.run(proxy(int(upstream), int(port), float(delay), [k for k in kinds.split(",") if k], int(every),
                      int(answered), down_part))
