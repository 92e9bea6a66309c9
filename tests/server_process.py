"""Servers in tests: the server app in a thread of the test process (`ServerThread`), or `llmc serve`
as a separate process (`start_server`), each on a free loopback port and ready when returned."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import httpx
import openai
import uvicorn

import llmc
from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.model import CacheSettings
from llmc.runtime.server import ServerLimits, create_app
from llmc.runtime.speculation import Speculation

MODEL = "tiny-chat"


class ServerThread:
    """The server app in uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, package: str, cache: CacheSettings, limits: ServerLimits = ServerLimits(),
                 speculation: Speculation | None = None):
        self.stopped: list[BaseException] = []
        self.engine = AsyncEngine(llmc.load(package, cache=cache, speculation=speculation),
                                  on_stop=self.stopped.append)
        config = uvicorn.Config(create_app(self.engine, MODEL, limits), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def pages_in_use_without_the_prefix_cache(self) -> int:
        """KV pages still in use once the prefix cache lets go of every sequence it keeps: anything but 0 when
        the server is idle is a leak. Call it only while no request runs (it acts from this thread)."""
        scheduler = self.engine.scheduler
        scheduler.prefix.clear()
        return scheduler.pages_total - scheduler.cache.free_pages()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(llmc_\w+) (\S+)$", text, re.MULTILINE)}


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
