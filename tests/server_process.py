"""`llmc serve` as a separate process in tests: start it on a free loopback port, wait until it answers."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], port: int, timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """Run `command` (an `llmc serve ... --port PORT`) until /health answers 200; the process and its URL."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/")
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"llmc serve exited: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("llmc serve did not start")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
