"""Start real ``testbed`` processes on loopback for end-to-end tests, and always stop them (by PID)."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

TESTBED = str(pathlib.Path(sys.executable).with_name("testbed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LISTENING = r"listening on http://[\d.]+:(\d+)"


class Proc:
    """One ``testbed`` process; ``port`` is the port it reported listening on.

    It is ready when a line matches ``ready`` (by default the "listening on" line, whose
    group 1 is the port)."""

    def __init__(self, *args: str, timeout: float = 15.0, ready: str = LISTENING) -> None:
        self.ready = re.compile(ready)
        self.args = [TESTBED, *args]
        self.popen = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port: int | None = None
        self.is_ready = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.is_ready:
            self.stop()
            raise RuntimeError(f"{' '.join(args)} did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            m = self.ready.search(line)
            if m and not self.is_ready:
                self.port = int(m.group(1)) if m.groups() else None
                self.is_ready = True
                self._ready.set()
        self.popen.stdout.close()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def send(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process by PID and wait; SIGKILL if it does not exit in time."""
        self.send(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(5)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request on a fresh connection: (status, headers, JSON or text body)."""
    m = re.match(r"http://([^:/]+):(\d+)(.*)", url)
    assert m, url
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else (headers or {})
        conn.request(method, m.group(3) or "/", body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return resp.status, dict(resp.getheaders()), parsed
    finally:
        conn.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" ({last_error})" if last_error else ""))
